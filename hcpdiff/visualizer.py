"""Render images from a base model and LoRAs: `python -m hcpdiff.visualizer --cfg cfgs/infer/t2i_lora.yaml key=value ...`."""
from __future__ import annotations

from hcpdiff.cli import cfg_parser, run_cli
from hcpdiff.config import load_config


def main(argv: list[str]) -> int:
    """Parse `--cfg` and overrides, load the config, render and save the images."""
    args = cfg_parser("python -m hcpdiff.visualizer", __doc__).parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    from hcpdiff.infer import generate  # heavy imports after the config is known to be good

    paths = generate(cfg)
    print(f"wrote {len(paths)} images to {paths[0].parent if paths else '-'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
