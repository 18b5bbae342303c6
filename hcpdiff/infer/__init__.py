"""Inference: build a diffusers pipeline from a base model, merge LoRAs, encode weighted prompts, save images."""
from hcpdiff.infer.prompt_weights import encode_weighted, parse_prompt_weights
from hcpdiff.infer.run import generate

__all__ = ["encode_weighted", "generate", "parse_prompt_weights"]
