"""Render images from a base model and LoRAs: `python -m hcpdiff.visualizer --cfg cfgs/infer/t2i_lora.yaml key=value ...`."""
from __future__ import annotations

import sys

from hcpdiff.cli import cfg_parser, run_cli
from hcpdiff.config.v1_compat import MIGRATE_HINT, load_maybe_v1


def main(argv: list[str]) -> int:
    """Parse `--cfg` and overrides, load the config, render and save the images."""
    args = cfg_parser("python -m hcpdiff.visualizer", __doc__).parse_args(argv)
    cfg, v1 = load_maybe_v1(args.cfg, args.overrides, kind="infer")
    if v1 is not None:
        print(f"note: {args.cfg} is an HCP-Diffusion v1 config, read as today's: {v1.summary()}. "
              f"`{MIGRATE_HINT}` writes it in today's spelling.", file=sys.stderr)
    from hcpdiff.infer import generate  # heavy imports after the config is known to be good

    paths = generate(cfg)
    print(f"wrote {len(paths)} images to {paths[0].parent if paths else '-'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
