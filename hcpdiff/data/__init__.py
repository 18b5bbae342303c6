"""Caption sources, prompt templates, aspect-ratio buckets, the image dataset and its batch sampler."""

from hcpdiff.data.buckets import Bucket, FixedBucket, MaxPixelsBucket, RatioBucket
from hcpdiff.data.builders import BuiltDataset, build_dataset
from hcpdiff.data.captions import load_captions
from hcpdiff.data.dataset import DataItem, ImageCaptionDataset
from hcpdiff.data.prompts import PromptBuilder, load_templates
from hcpdiff.data.transforms import CaptionTransform, ImageTransform
from hcpdiff.data.sampler import BucketBatchSampler

__all__ = [
    "Bucket",
    "BucketBatchSampler",
    "BuiltDataset",
    "CaptionTransform",
    "DataItem",
    "FixedBucket",
    "ImageTransform",
    "ImageCaptionDataset",
    "MaxPixelsBucket",
    "PromptBuilder",
    "RatioBucket",
    "build_dataset",
    "load_captions",
    "load_templates",
]
