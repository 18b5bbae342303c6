"""hcpdiff: a YAML-config-driven trainer for text-to-image diffusion models."""
import logging


class _NoTorchvisionNotice(logging.Filter):
    """transformers 5 warns, on importing diffusers' pipelines, that each image processor they name falls back to its
    PIL version without torchvision. hcpdiff needs no torchvision (its VL processors run on the PIL version), so the
    notice, three lines on every command, is dropped; every other transformers message is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

__version__ = "0.1.0"
