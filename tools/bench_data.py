"""Images/s through hcpdiff's dataset vs a bare PIL loop on the same generated files, for DataLoader workers 0 and 2,
and through the latent cache once it is filled (counting the image files opened in those epochs: none expected).

    python tools/bench_data.py                        # 64 JPEGs 512-1024 px
    python tools/bench_data.py --sides 2000 4000      # camera-size photos (reduced-scale JPEG decoding)
    python tools/bench_data.py --transfer             # a worker's batch reaching the training process: the
        # training process's CPU ms per batch for uint8 pixel batches of 24 KiB to 6 MiB, handed over as torch shares
        # tensors (shared-memory file + descriptor over a socket) and inline in the batch's message (InlineTensor)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hcpdiff.data import build_dataset
from hcpdiff.data.latent_cache import LatentEncoder
from hcpdiff.train.streams import INLINE_MAX_BYTES, InlineTensor, received


class BarePilDataset(Dataset):
    """open, convert RGB, cover-resize, center crop, numpy -> tensor: the minimum any loader must do."""

    def __init__(self, paths: list[Path], size_of: dict[str, tuple[int, int]]) -> None:
        self.paths = paths
        self.size_of = size_of

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        bucket_w, bucket_h = self.size_of[path.name]
        with Image.open(path) as opened:
            img = opened.convert("RGB")
        scale = max(bucket_w / img.width, bucket_h / img.height)
        new_w, new_h = max(bucket_w, round(img.width * scale)), max(bucket_h, round(img.height * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
        img = img.crop((left, top, left + bucket_w, top + bucket_h))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def make_images(folder: Path, count: int, seed: int = 0, sides: tuple[int, int] = (512, 1024)) -> list[Path]:
    """`count` JPEGs with sides in `sides` px (smooth noise, so they compress like photos)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        small = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        path = folder / f"img{i:03d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(loader: DataLoader, num_images: int, epochs: int) -> float:
    """Iterate the loader `epochs` times (first pass is warm-up and not timed)."""
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return num_images * epochs / (time.perf_counter() - start)


def pooled_latents(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in VAE (8x average pooling): this measures the loader, not the encoder."""
    mean = torch.nn.functional.avg_pool2d(pixel_values.float(), 8)
    return mean, torch.full_like(mean, 0.1)


class PixelBatches(Dataset):
    """Batches of uint8 pixels made in the worker (no decoding: this measures the hand-over alone)."""

    def __init__(self, batch: int, side: int, inline: bool) -> None:
        self.batch, self.side, self.inline = batch, side, inline

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> dict:
        pixels = torch.full((self.batch, 3, self.side, self.side), index % 255, dtype=torch.uint8)
        return {"pixel_values": InlineTensor(pixels) if self.inline else pixels}


def transfer(workers: int = 2, batches: int = 200) -> None:
    """The training process's CPU time (and wall time) per batch received from `workers` workers, both ways."""
    print(f"a batch from {workers} workers to the training process, {batches} batches after 20 warm-up "
          f"(the trainer sends up to {INLINE_MAX_BYTES / 2**20:g} MiB inline):")
    for batch, side in ((2, 64), (2, 128), (2, 256), (2, 512), (4, 512), (8, 512)):
        cpu_ms = {}
        line = f"  {batch} x 3 x {side} x {side} uint8 ({batch * 3 * side * side / 2**10:5.0f} KiB):"
        for way in ("shared", "inline"):
            loader = DataLoader(PixelBatches(batch, side, way == "inline"), batch_size=None, num_workers=workers,
                                collate_fn=_as_is, persistent_workers=True, prefetch_factor=4)
            it = iter(loader)
            for _ in range(20):
                next(it)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(batches):
                received(next(it))["pixel_values"].sum()  # read it: shared memory is mapped in page by page
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            cpu_ms[way] = cpu / batches * 1e3
            line += f"  {way} {cpu_ms[way]:6.3f} ms CPU ({wall / batches * 1e3:6.3f} wall)"
            del it, loader
        print(f"{line}  ratio inline / shared {cpu_ms['inline'] / cpu_ms['shared']:.2f}")


def _as_is(item):
    return item


def main() -> None:
    """Generate images, then time both pipelines with each worker count."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sides", type=int, nargs=2, default=[512, 1024], metavar=("MIN", "MAX"),
                        help="image side range in px (e.g. 2000 4000 for camera photos)")
    parser.add_argument("--transfer", action="store_true", help="time a worker's batch reaching the training "
                                                                 "process, shared vs inline")
    parser.add_argument("--transfer_batches", type=int, default=200, help="--transfer: timed batches per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.transfer:
        return transfer(batches=args.transfer_batches)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, sides=tuple(args.sides))
        node = {"batch_size": 4, "source": {"s": {"img_root": tmp}},
                "bucket": {"_target_": "hcpdiff.data.RatioBucket.from_files", "target_area": 512 * 512, "num_bucket": 4}}
        built = build_dataset(node, "data.bench", pixel_step=64, seed=0)
        size_of = {Path(item.path).name: built.bucket.size_of(item.key) for item in built.dataset.items}
        bare = BarePilDataset(paths, size_of)
        print(f"{args.images} JPEGs {args.sides[0]}-{args.sides[1]} px, buckets {built.bucket.sizes}, {args.epochs} timed epochs after 1 warm-up")
        for workers in args.workers:
            hcp_loader = DataLoader(built.dataset, batch_sampler=built.batch_sampler, num_workers=workers)
            bare_loader = DataLoader(bare, batch_size=1, num_workers=workers)
            hcp_rate = images_per_second(hcp_loader, args.images, args.epochs)
            bare_rate = images_per_second(bare_loader, args.images, args.epochs)
            print(f"workers={workers}: hcpdiff {hcp_rate:6.1f} img/s   bare PIL {bare_rate:6.1f} img/s   "
                  f"ratio hcpdiff/bare {hcp_rate / bare_rate:.2f}")
        cached = build_dataset({**node, "cache_latents": True}, "data.bench", pixel_step=64, seed=0, show_progress=False,
                               latent_encoder=LatentEncoder(pooled_latents, "avgpool8"))
        opened = []
        real_open = Image.open
        Image.open = lambda *a, **k: opened.append(a) or real_open(*a, **k)
        try:
            cached_rate = images_per_second(DataLoader(cached.dataset, batch_sampler=cached.batch_sampler), args.images,
                                            args.epochs)
        finally:
            Image.open = real_open
        print(f"latent cache hits (workers=0): {cached_rate:8.1f} img/s   image files opened in cached epochs: {len(opened)}")


if __name__ == "__main__":
    main()
