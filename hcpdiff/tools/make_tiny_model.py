"""Write a tiny random-weight Stable Diffusion 1.x pipeline in diffusers format, for tests and demos."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TEXT_WIDTH = 32


def byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (no longer importable from transformers 5)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout without merges: 256 byte characters, the same with `</w>`, then bos and eos."""
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built offline from the byte-level vocabulary (every word splits into bytes)."""
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int, hidden_act: str = "quick_gelu") -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder (`quick_gelu` as OpenAI CLIP-L in SD1.x, `gelu` as OpenCLIP-H in SD2.x)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=TEXT_WIDTH,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


# The tiny U-Nets' shared layout: two levels (32/64 channels), cross-attention in the lower one, as SD lays it out.
TINY_UNET_LAYOUT = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def build_unet() -> UNet2DConditionModel:
    """A 2-level U-Net (32/64 channels) with cross-attention in the lower level, as SD1.x lays it out."""
    return UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_sd2_unet() -> UNet2DConditionModel:
    """The SD1.x tiny U-Net with SD2.x's differences: linear in/out projections and per-level head widths."""
    return UNet2DConditionModel(
        **TINY_UNET_LAYOUT,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(4, 8),  # SD2.x lists one per level ([5, 10, 20, 20]); SD1.x gives one number
        use_linear_projection=True,
        norm_num_groups=32,
    )


def build_vae() -> AutoencoderKL:
    """A 4-block VAE so it downsamples 8x like the real one (see FACTS: fewer blocks break pixel-step math)."""
    blocks = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
    )


def build_scheduler() -> PNDMScheduler:
    """The scheduler SD1.5 ships with (PNDM, scaled-linear betas 0.00085 -> 0.012, 1000 steps)."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def build_sd2_scheduler() -> DDIMScheduler:
    """The scheduler SD2.x 768-v ships with: DDIM, the same betas, v-prediction."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )


def write_slow_tokenizer_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Write vocab.json and merges.txt beside tokenizer.json, for readers that expect the slow-tokenizer files."""
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def make_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny pipeline of `family` (a `make_tiny_model --family` name: sd, sd2, sdxl, ...) into `out_dir`."""
    from hcpdiff.families import tiny_variant_family

    return tiny_variant_family(family).make_tiny(Path(out_dir), seed=seed, variant=family)


def make_tiny_sd(out_dir: str | Path, seed: int = 0, v_prediction: bool = False) -> Path:
    """The tiny SD1.x pipeline, or with `v_prediction` the SD2.x layout with a v-prediction scheduler."""
    sd2 = v_prediction
    out_path = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                      hidden_act="gelu" if sd2 else "quick_gelu")
    pipeline = StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_sd2_unet() if sd2 else build_unet(),
        scheduler=build_sd2_scheduler() if sd2 else build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_path, safe_serialization=True)
    write_slow_tokenizer_files(tokenizer, out_path / "tokenizer")
    return out_path


def make_tiny_controlnet(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny ControlNet for the tiny SD / SDXL model in `model_dir` (diffusers' ControlNetModel.from_unet, small
    conditioning embedding), its zero convolutions given random weights as a trained ControlNet's are, so renders
    change with it; written as a diffusers ControlNet folder."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                          controlnet.controlnet_cond_embedding.conv_out]:
            zero_conv.weight.normal_(0, 0.05)
    controlnet.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def main(argv: list[str]) -> int:
    """CLI: `python -m hcpdiff.tools.make_tiny_model OUT [--seed N]`."""
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.make_tiny_model", description=__doc__)
    parser.add_argument("out_dir", help="folder to write the pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    from hcpdiff.families import tiny_variants

    parser.add_argument("--family", choices=tiny_variants(), default="sd",
                        help="sd: SD1.x (epsilon); sd2: SD2.x layout with a v-prediction scheduler; "
                             "sdxl: two text encoders and text_time conditioning; flux: FLUX.1-dev layout (CLIP + "
                             "T5, guidance embedding); flux-schnell: FLUX.1-schnell layout; flux_kontext: FLUX.1 Kontext (FLUX.1-dev's parts as a "
                             "FluxKontextPipeline); sd3: SD3-medium layout (CLIP-L, "
                             "CLIP-G, T5); sd3.5: SD3.5-medium layout (q/k norms, dual attention); qwen_image: Qwen-Image "
                             "layout (Qwen2.5-VL text encoder, 60 blocks, per-channel VAE latents); z_image: Z-Image layout (Qwen3 text "
                             "encoder, 30 single-stream blocks, static shift 6); z_image-turbo: Z-Image-Turbo's "
                             "scheduler (shift 3); flux2_klein: FLUX.2 [klein] layout (Qwen3 text encoder, 2 + 4 blocks, FLUX.2 "
                             "VAE with batch-norm statistics); flux2_klein-distilled: the same with is_distilled; flux2_dev: FLUX.2 [dev] "
                             "layout (Mistral3 text encoder, guidance embedding, klein's VAE)")
    parser.add_argument("--controlnet", metavar="DIR", help="sd, sd2, sdxl: also write a tiny ControlNet for the model "
                        "(random, not zero, output convolutions) into DIR")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    if args.controlnet:
        from hcpdiff.families import tiny_variant_family

        from hcpdiff.errors import ConfigError

        if not tiny_variant_family(args.family).takes_controlnet:
            raise ConfigError(f"--controlnet: a {args.family} model takes no ControlNet here (sd, sd2 and sdxl do)")
    print(make_tiny_model(args.out_dir, seed=args.seed, family=args.family))
    if args.controlnet:
        print(make_tiny_controlnet(args.out_dir, args.controlnet, seed=args.seed))
    return 0


if __name__ == "__main__":
    from hcpdiff.cli import run_cli

    run_cli(main)
