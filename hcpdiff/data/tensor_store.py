"""Named tensors by string key, in memory or one safetensors file per key in a folder: what the latent cache and the
text-embedding cache store their entries in.

On disk an entry's file is named by a hash of its key and holds the key in its metadata; an entry is used only when
that key matches (a hash clash, a copied or damaged file is a miss, encoded again). Writes go to a temporary name and
are renamed, so a killed run leaves no half entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hcpdiff.errors import DataError
from hcpdiff.folders import make_folder


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a quantized tensor subclass's stored parts (torchao's
    int8 / fp8 / nf4 weights keep their data and scales as inner tensors, listed by `__tensor_flatten__`)."""
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in plain_tensors(getattr(tensor, name))]


def weights_identity(module: torch.nn.Module, name_or_path: str, bytes_per_tensor: int = 4096,
                     first_tensor_bytes: int = 1 << 20) -> str:
    """`<model path>|<dtype>|<sha256 of the config, every tensor's name and shape, its first bytes and 1 MiB of the
    first>`: a different model, precision or merged-in weights (a LoRA fused into any layer changes its first bytes)
    gives a different string, for cache keys. Reads a few KiB per tensor, not the whole model."""
    config = getattr(module, "config", None)
    config_items = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    digest = hashlib.sha256(json.dumps(config_items, sort_keys=True, default=str).encode())
    dtype = "none"
    for index, (name, tensor) in enumerate(module.state_dict().items()):
        if index == 0:
            dtype = str(tensor.dtype).replace("torch.", "")
        limit = first_tensor_bytes if index == 0 else bytes_per_tensor
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{type(tensor).__name__}".encode())
        for stored in plain_tensors(tensor.detach()):
            head = stored.reshape(-1)[: max(1, limit // stored.element_size())]
            digest.update(head.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"{name_or_path}|{dtype}|{digest.hexdigest()[:16]}"


class TensorStore:
    """Entries ({name: tensor}) by key: a dict when `cache_dir` is None, else one safetensors file per key there."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, what: str = "cache", where: str = "cache_dir") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.what = what  # for messages: "latent cache", "text cache"
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.cache_dir is not None:
            make_folder(self.cache_dir, where)  # `where`: the config key a folder the disk refuses is named by

    def file_of(self, key: str) -> Path:
        """Where the entry for `key` lives on disk."""
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def __contains__(self, key: str) -> bool:
        if self.cache_dir is None:
            return key in self._memory
        return self._read(key, tensors=False) is not None

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The stored entry; DataError when it is gone or holds another key."""
        if self.cache_dir is None:
            return self._memory[key]
        entry = self._read(key, tensors=True)
        if entry is None:
            raise DataError(f"{self.what.capitalize()} entry {self.file_of(key)} is missing or stale; "
                            "delete the cache_dir and rerun.")
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store one entry (detached, on the CPU; on disk written to a temporary name, then renamed)."""
        entry = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        if self.cache_dir is None:
            self._memory[key] = entry
            return
        path = self.file_of(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(entry, str(tmp), metadata={"key": key})
        os.replace(tmp, path)

    def _read(self, key: str, tensors: bool) -> dict[str, torch.Tensor] | bool | None:
        path = self.file_of(key)
        try:
            with safe_open(str(path), framework="pt") as stored:
                if (stored.metadata() or {}).get("key") != key:
                    return None  # a hash collision or a damaged file: never use it
                return {name: stored.get_tensor(name) for name in stored.keys()} if tensors else True
        except Exception:  # noqa: BLE001 - a missing or unreadable file is a miss, encoded again
            return None
