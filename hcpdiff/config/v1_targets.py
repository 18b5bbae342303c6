"""HCP-Diffusion v1's `_target_` paths: the ones today's classes replace, and what replaces the rest (one sentence)."""
from __future__ import annotations

CONTROLNET = ("v1's ControlNet plugin does not migrate; write today's: model.controlnet, a controlnet: group and "
              "condition_column (cfgs/train/examples/controlnet.yaml), the visualizer's controlnet: list "
              "(cfgs/infer/controlnet.yaml)")
DREAMARTIST = "DreamArtist's positive/negative branches have no replacement; train a LoRA (lora_unet) instead"

# v1 bucket -> today's bucket; both are built as partials with the images' sizes.
BUCKETS = {
    "hcpdiff.data.bucket.RatioBucket.from_files": "hcpdiff.data.RatioBucket.from_files",
    "hcpdiff.data.bucket.RatioBucket.from_ratios": "hcpdiff.data.RatioBucket.from_ratios",
    "hcpdiff.data.bucket.FixedBucket": "hcpdiff.data.FixedBucket",
    "hcpdiff.data.RatioBucket.from_files": "hcpdiff.data.RatioBucket.from_files",
    "hcpdiff.data.RatioBucket.from_ratios": "hcpdiff.data.RatioBucket.from_ratios",
    "hcpdiff.data.FixedBucket": "hcpdiff.data.FixedBucket",
}
# v1 buckets that today's MaxPixelsBucket replaces (each image keeps its own size, capped at max_pixels).
SIZE_BUCKETS = ("hcpdiff.data.bucket.SizeBucket.from_files", "hcpdiff.data.bucket.SizeBucket",
                "hcpdiff.data.bucket.RatioSizeBucket.from_files", "hcpdiff.data.bucket.RatioSizeBucket")

# v1 dataset classes whose work today's one dataset does (SDXL's crop / size conditioning is built in).
DATASETS = ("hcpdiff.data.TextImagePairDataset", "hcpdiff.data.pair_dataset.TextImagePairDataset",
            "hcpdiff.data.CropInfoPairDataset", "hcpdiff.data.crop_info_dataset.CropInfoPairDataset")
# v1 caption sources whose keys (img_root, caption_file, prompt_template, word_names, bg_color) today's source reads.
SOURCES = ("hcpdiff.data.source.Text2ImageSource", "hcpdiff.data.source.Text2ImageAttMapSource",
           "hcpdiff.data.source.text2img.Text2ImageSource", "hcpdiff.data.source.text2img.Text2ImageAttMapSource")
# v1 caption loaders: their `path` is today's caption_file (the format is detected from the file).
CAPTION_LOADERS = ("hcpdiff.data.JsonCaptionLoader", "hcpdiff.data.TXTCaptionLoader", "hcpdiff.data.YamlCaptionLoader",
                   "hcpdiff.data.caption_loader.JsonCaptionLoader", "hcpdiff.data.caption_loader.TXTCaptionLoader",
                   "hcpdiff.data.caption_loader.YamlCaptionLoader")
# v1 loggers: train.log and TensorBoard are always written today; W&B is `train.log_with: [tensorboard, wandb]`.
LOGGERS = {"hcpdiff.loggers.CLILogger": None, "hcpdiff.loggers.TBLogger": None, "hcpdiff.loggers.WanDBLogger": "wandb"}
MSE_LOSSES = ("torch.nn.MSELoss",)
MIN_SNR_LOSSES = ("hcpdiff.loss.MinSNRLoss",)
EMA = ("hcpdiff.utils.ema.ModelEMA",)
DISK_INTERFACE = ("hcpdiff.vis.DiskInterface",)

# v1 targets with no counterpart today, and what to use instead.
REFUSED = {
    "hcpdiff.data.TextImageCondPairDataset": CONTROLNET,
    "hcpdiff.data.source.Text2ImageCondSource": CONTROLNET,
    "hcpdiff.models.controlnet.ControlNetPlugin": CONTROLNET,
    "hcpdiff.data.data_processor.ControlNetProcessor": CONTROLNET,
    "hcpdiff.data.source.T2IFolderClassSource": ("class folders are not read; give each image its caption in a "
                                                 "caption_file (.txt sidecars, .json, .csv) instead"),
    "hcpdiff.data.bucket.LongEdgeBucket.from_files": "use hcpdiff.data.RatioBucket.from_files with target_area",
    "hcpdiff.data.bucket.LongEdgeBucket": "use hcpdiff.data.RatioBucket.from_files with target_area",
    "hcpdiff.loss.SoftMinSNRLoss": "use train.loss.min_snr_gamma (min-SNR weighting)",
    "hcpdiff.loss.KDiffMinSNRLoss": "use train.loss.min_snr_gamma (min-SNR weighting)",
    "hcpdiff.loss.EDMLoss": "EDM training has no replacement",
    "hcpdiff.loggers.WebUILogger": "use train.log_with (tensorboard, wandb)",
    "hcpdiff.loggers.preview.ImagePreviewer": ("use previewer: {step, prompts, neg_prompt, seed, width, height, "
                                               "num_inference_steps, guidance_scale}"),
    "hcpdiff.noise.PyramidNoiseScheduler": "use train.loss.pyramid_noise_levels and train.loss.pyramid_noise_discount",
    "hcpdiff.noise.ZeroTerminalScheduler": "use train.loss.zero_terminal_snr: true with prediction_type v_prediction",
}


def refused_reason(target: str) -> str:
    """What replaces a v1 `_target_` that has no counterpart (a generic sentence for unknown v1 paths)."""
    if target in REFUSED:
        return REFUSED[target]
    if "TagErase" in target or "caption_tools" in target:
        return "use the source keys tag_shuffle, keep_tokens, tag_dropout and caption_dropout"
    return "it is an HCP-Diffusion v1 class with no counterpart here; see README 'Coming from HCP-Diffusion v1'"
