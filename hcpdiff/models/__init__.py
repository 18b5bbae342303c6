"""Model families: load a base model's parts, encode prompts, gradient checkpointing."""
from hcpdiff.models.checkpointing import checkpoint_blocks, enable_gradient_checkpointing
from hcpdiff.models.conditioning import SDConditioner, build_conditioner, cast_floats
from hcpdiff.models.loading import load_model_parts
from hcpdiff.models.parts import ModelParts
from hcpdiff.models.prompt_encoder import PromptEncoder

__all__ = ["ModelParts", "PromptEncoder", "SDConditioner", "build_conditioner", "cast_floats", "checkpoint_blocks", "enable_gradient_checkpointing", "load_model_parts"]
