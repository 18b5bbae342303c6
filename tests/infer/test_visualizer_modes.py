"""The visualizer's img2img, inpaint and highres-fix modes and zero-terminal-SNR sampling, as a user runs them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SMALL = ["infer_args.width=64", "infer_args.height=64", "infer_args.num_inference_steps=4", "prompt='a (cat:1.2)'"]


@pytest.fixture(scope="module")
def faithful_model(tmp_path_factory, tiny_model: Path) -> Path:
    """The tiny SD model with a VAE that behaves like a trained one at the latent scale: a deterministic posterior and
    a scaling factor giving unit-std latents (a random VAE's posterior noise and tiny latents drown any init image)."""
    from diffusers import AutoencoderKL

    model = tmp_path_factory.mktemp("faithful") / "model"
    shutil.copytree(tiny_model, model)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0  # the log-variance half of the posterior
        vae.quant_conv.bias[channels:] = -30.0
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(model / "vae")
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A smooth 80x64 init image (cropped to 64x64 by the visualizer) and a mask repainting its central square."""
    folder = tmp_path_factory.mktemp("inputs")
    y, x = np.mgrid[0:64, 0:80]
    Image.fromarray(np.stack([x * 3, y * 4, np.full_like(x, 128)], -1).astype("uint8")).save(folder / "init.png")
    mask = np.zeros((64, 64), dtype="uint8")
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return {"init": folder / "init.png", "mask": folder / "mask.png"}


def visualize(cli_in_process, workdir: Path, model: Path, out: str, *overrides: str,
              cfg: str = "cfgs/infer/text2img.yaml") -> list[Path]:
    """`python -m hcpdiff.visualizer` in this process; the written images."""
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", cfg, f"pretrained_model={model}", *SMALL,
                           f"save.out_dir={out}", *overrides], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted((workdir / out).glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(float)


def vae_reconstruction(model: Path, image: Path) -> np.ndarray:
    """The init image (center-cropped to 64x64) through the model's VAE: what img2img gives with no denoising."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from hcpdiff.data.images import load_image, resize_and_crop

    vae, processor = AutoencoderKL.from_pretrained(model, subfolder="vae"), VaeImageProcessor(vae_scale_factor=8)
    pixel_values = processor.preprocess(resize_and_crop(load_image(image), (64, 64)))
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixel_values).latent_dist.mean).sample
    return processor.postprocess(decoded, output_type="np")[0] * 255


def test_img2img_low_strength_keeps_the_init_image_full_strength_does_not(cli_in_process, workdir, faithful_model,
                                                                          images):
    init = f"init_image={images['init']}"
    low = visualize(cli_in_process, workdir, faithful_model, "low", init, "infer_args.strength=0.02",
                    "infer_args.num_inference_steps=50")[0]
    full = visualize(cli_in_process, workdir, faithful_model, "full", init, "infer_args.strength=1.0")[0]
    reference = vae_reconstruction(faithful_model, images["init"])
    # the random VAE cannot give the init image back exactly; its own reconstruction is what img2img can reach
    assert np.abs(pixels(low) - reference).mean() < 12
    assert np.abs(pixels(full) - reference).mean() > 25
    text = Image.open(low).text
    assert "Denoising strength: 0.02" in text["parameters"] and f"Init image: {images['init']}" in text["parameters"]
    info = json.loads(text["hcpdiff"])
    assert info["mode"] == "img2img" and info["strength"] == 0.02 and info["init_image"] == str(images["init"])


def test_inpaint_keeps_unmasked_pixels(cli_in_process, workdir, tiny_model, images):
    paths = visualize(cli_in_process, workdir, tiny_model, "inpaint", f"init_image={images['init']}",
                      f"mask_image={images['mask']}", "infer_args.strength=1.0", "num=2", "bs=2")
    original = np.asarray(Image.open(images["init"]).convert("RGB").crop((8, 0, 72, 64))).astype(float)
    keep = np.asarray(Image.open(images["mask"])) == 0
    for path in paths:
        inpainted = pixels(path)
        assert np.array_equal(inpainted[keep], original[keep])  # outside the mask: the original pixels
        assert np.abs(inpainted[~keep] - original[~keep]).mean() > 10  # inside: repainted
    info = json.loads(Image.open(paths[0]).text["hcpdiff"])
    assert info["mode"] == "inpaint" and info["mask_image"] == str(images["mask"]) and info["strength"] == 1.0


@pytest.mark.parametrize("upscale, scale, size", [("latent", 1.5, 96), ("pixel", 2, 128)])
def test_highres_fix_writes_the_scaled_size(cli_in_process, workdir, tiny_model, upscale, scale, size):
    paths = visualize(cli_in_process, workdir, tiny_model, f"hr-{upscale}",
                      f"highres_fix={{scale: {scale}, upscale: {upscale}, strength: 0.5, steps: 2}}")
    assert Image.open(paths[0]).size == (size, size)
    text = Image.open(paths[0]).text
    assert "Size: 64x64" in text["parameters"] and f"Hires resize: {size}x{size}" in text["parameters"]
    assert "Hires steps: 2" in text["parameters"] and "Denoising strength: 0.5" in text["parameters"]
    assert json.loads(text["hcpdiff"])["highres_fix"]["upscale"] == upscale


def test_sdxl_renders_every_mode(cli_in_process, workdir, tiny_sdxl, images):
    cfg = "cfgs/infer/text2img_sdxl.yaml"
    init, mask = f"init_image={images['init']}", f"mask_image={images['mask']}"
    img2img = visualize(cli_in_process, workdir, tiny_sdxl, "xl-i2i", init, cfg=cfg)[0]
    inpaint = visualize(cli_in_process, workdir, tiny_sdxl, "xl-inpaint", init, mask, cfg=cfg)[0]
    highres = visualize(cli_in_process, workdir, tiny_sdxl, "xl-hr", "highres_fix={scale: 1.5}", cfg=cfg)[0]
    assert [json.loads(Image.open(p).text["hcpdiff"])["mode"] for p in (img2img, inpaint, highres)] == \
        ["img2img", "inpaint", "txt2img"]
    assert Image.open(img2img).size == (64, 64) and Image.open(highres).size == (96, 96)
    keep = np.asarray(Image.open(images["mask"])) == 0
    original = np.asarray(Image.open(images["init"]).convert("RGB").crop((8, 0, 72, 64))).astype(float)
    assert np.array_equal(pixels(inpaint)[keep], original[keep])


def test_zero_terminal_snr_sampling_with_guidance_rescale(cli_in_process, workdir, tiny_model):
    plain = visualize(cli_in_process, workdir, tiny_model, "plain")[0]
    zero_snr = visualize(cli_in_process, workdir, tiny_model, "zsnr", "zero_terminal_snr=true",
                         "infer_args.guidance_rescale=0.7")[0]
    assert not np.array_equal(pixels(plain), pixels(zero_snr))
    text = Image.open(zero_snr).text
    assert "Sampler: DDIMScheduler" in text["parameters"] and "CFG Rescale phi: 0.7" in text["parameters"]
    info = json.loads(text["hcpdiff"])
    assert info["zero_terminal_snr"] is True and info["guidance_rescale"] == 0.7


@pytest.mark.parametrize("overrides, words", [
    (["init_image=missing.png"], "init_image: no such file 'missing.png'"),
    (["init_image={init}", "mask_image=nomask.png"], "mask_image: no such file 'nomask.png'"),
    (["mask_image={mask}"], "mask_image: inpainting needs init_image too"),
    (["init_image={init}", "infer_args.strength=0.1"], "infer_args.strength: 0.1 x 4 steps leaves no denoising step"),
    (["init_image={init}", "highres_fix={scale: 2}"], "highres_fix: a second pass after text to image"),
    (["highres_fix={scale: 2, upscale: nearest}"], "highres_fix.upscale: 'nearest' is not one of latent, pixel"),
    (["init_image={init}", "infer_args.guidance_rescale=0.7"],
     "infer_args.guidance_rescale: diffusers' StableDiffusionImg2ImgPipeline has no guidance_rescale"),
])
def test_mode_mistakes_are_one_error_line(cli_in_process, one_error_line, workdir, tiny_model, images, overrides,
                                          words):
    filled = [item.replace("{init}", str(images["init"])).replace("{mask}", str(images["mask"])) for item in overrides]
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img.yaml",
                           f"pretrained_model={tiny_model}", *SMALL, "save.out_dir=bad", *filled], cwd=workdir)
    assert words in one_error_line(done)
    assert not list(workdir.glob("bad/*.png"))


@pytest.fixture(scope="module")
def other_families(tmp_path_factory) -> dict[str, Path]:
    """Tiny FLUX.1-dev, SD3 and Qwen-Image models (~5 s to build, together)."""
    from hcpdiff.families import tiny_variant_family

    root = tmp_path_factory.mktemp("families")
    return {variant: tiny_variant_family(variant).make_tiny(root / variant, seed=0, variant=variant)
            for variant in ("flux", "sd3", "qwen_image")}


@pytest.mark.parametrize("variant, cfg", [("flux", "text2img_flux"), ("sd3", "text2img_sd3"),
                                          ("qwen_image", "text2img_qwen_image")])
def test_flow_matching_families_render_img2img_inpaint_and_a_pixel_highres_fix(cli_in_process, workdir, images,
                                                                               other_families, variant, cfg):
    model, cfg = other_families[variant], f"cfgs/infer/{cfg}.yaml"
    init, mask = f"init_image={images['init']}", f"mask_image={images['mask']}"
    img2img = visualize(cli_in_process, workdir, model, f"{variant}-i2i", init, "dtype=fp32", cfg=cfg)[0]
    inpaint = visualize(cli_in_process, workdir, model, f"{variant}-inpaint", init, mask, "dtype=fp32", cfg=cfg)[0]
    assert json.loads(Image.open(img2img).text["hcpdiff"])["mode"] == "img2img"
    keep = np.asarray(Image.open(images["mask"])) == 0
    original = np.asarray(Image.open(images["init"]).convert("RGB").crop((8, 0, 72, 64))).astype(float)
    assert np.array_equal(pixels(inpaint)[keep], original[keep])
    if variant == "sd3":  # the highres fix is img2img after text to image: one family shows it
        highres = visualize(cli_in_process, workdir, model, "sd3-hr", "dtype=fp32",
                            "highres_fix={scale: 2, upscale: pixel, steps: 2}", cfg=cfg)[0]
        assert Image.open(highres).size == (128, 128)


def test_packed_latents_refuse_a_latent_upscale_in_one_line(cli_in_process, one_error_line, workdir, other_families):
    done = cli_in_process(["-m", "hcpdiff.visualizer", "--cfg", "cfgs/infer/text2img_flux.yaml",
                           f"pretrained_model={other_families['flux']}", *SMALL, "highres_fix={scale: 2}"], cwd=workdir)
    line = one_error_line(done)
    assert "highres_fix.upscale: latent_upscale is not supported for a FLUX.1" in line and "upscale: pixel" in line
