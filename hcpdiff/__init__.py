"""hcpdiff: a YAML-config-driven trainer for text-to-image diffusion models."""
import logging


class _DropNotice(logging.Filter):
    """Drops one library's import-time notice about an optional backend hcpdiff does not use; every other message of
    that logger is kept."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# transformers 5, on importing diffusers' pipelines: each image processor they name falls back to its PIL version
# without torchvision (hcpdiff's VL processors run on the PIL version); three lines on every command
logging.getLogger("transformers.utils.import_utils").addFilter(
    _DropNotice("requires torchvision (not installed); falling back to"))
# torchao (model.quantize; peft imports it when installed): its CUDA kernel libraries cannot load on a CPU-only torch,
# and torch warns about its enum registration; two lines on every run, whatever the run quantizes
logging.getLogger("torchao").addFilter(_DropNotice("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(_DropNotice("is an Enum subclass and is now natively supported"))

__version__ = "0.1.0"
