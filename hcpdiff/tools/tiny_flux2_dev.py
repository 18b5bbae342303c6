"""A tiny random-weight FLUX.2 [dev] pipeline (Flux2Pipeline), for tests and demos, built offline.

FLUX.2 [klein]'s tiny parts (tiny_flux2: the FLUX.2 VAE with batch-norm statistics, the scheduler) with FLUX.2 [dev]'s
own: a Flux2Transformer2DModel with a guidance embedding (2 double, 4 single blocks, joint_attention_dim = 3 text
widths, as the pipeline stacks hidden states 10, 20 and 30), a Mistral3ForConditionalGeneration text encoder (a
32-layer Mistral text model of width 16, so 30 is a middle layer as in the real 40, and a one-layer Pixtral vision
tower: the class has one) and an offline byte-level BPE tokenizer with Mistral's control tokens and a chat template of
Mistral Small 3.1's form (`[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`), trained on the pipeline's system
message so each of its words is one token.

The real folder's `tokenizer/` is a PixtralProcessor, which transformers builds only with torchvision installed (not a
test dependency); the pipeline's text path calls just its `apply_chat_template` on text messages, which a tokenizer
with a chat template has too, so the tiny folder saves the tokenizer alone: AutoProcessor (Flux2Pipeline's loader and
the family's) then loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

from hcpdiff.tools.tiny_flux2 import LATENT_CHANNELS, SCHEDULER, build_flux2_vae

TEXT_WIDTH = 16  # the Mistral text model's hidden size; the transformer reads 3 stacked layers: 3 x 16
TEXT_LAYERS = 32  # > 30, the deepest hidden state Flux2Pipeline reads (Mistral Small 3.1 has 40)
CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                  "[IMG]", "[IMG_BREAK]", "[IMG_END]")
# Mistral Small 3.1's template in form: the system message, then each user turn in [INST] ... [/INST], text parts only
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")
CAPTION_WORDS = " a red circle blue square photo of the objects and background, texture and color detailing"


def build_flux2_dev_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on the pipeline's system message and a few caption words, with Mistral's
    control tokens (`<s>` bos, `</s>` eos, `<pad>` padding) and the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(CONTROL_TOKENS), show_progress=False)
    bpe.train_from_iterator([SYSTEM_MESSAGE + CAPTION_WORDS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>",
                                        additional_special_tokens=list(CONTROL_TOKENS[4:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def build_flux2_dev_text_encoder(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    """Mistral3 at tiny width: a 32-layer Mistral text model of 16 (2 heads of 8, one key/value head) and a one-layer
    Pixtral vision tower of 16."""
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=56, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config)


def build_flux2_dev_transformer() -> Flux2Transformer2DModel:
    """2 double and 4 single blocks at width 32 (2 heads of 16, rope axes 4 x 4), with the guidance embedding."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=True,
    )


def make_tiny_flux2_dev(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny FLUX.2 [dev] pipeline in diffusers format (the tokenizer in `tokenizer/`, see the module note)."""
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_flux2_dev_tokenizer()
    pipeline = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=build_flux2_vae(),
        text_encoder=build_flux2_dev_text_encoder(tokenizer), tokenizer=tokenizer,
        transformer=build_flux2_dev_transformer(),
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    return out_path
