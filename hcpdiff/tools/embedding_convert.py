"""Convert prompt embeddings between hcpdiff and a1111 / ComfyUI (safetensors only, never pickle).

  python -m hcpdiff.tools.embedding_convert --to_webui embs/pt-cat1.safetensors --dump_path pt-cat1.safetensors
  python -m hcpdiff.tools.embedding_convert --from_webui their.safetensors --dump_path embs/their.safetensors

a1111 / ComfyUI files hold `emb_params` [n, 768] (SD1.x; 1024 wide for SD2.x) or `clip_l` [n, 768] and `clip_g`
[n, 1280] (SDXL); hcpdiff's hold the same tensors under the text encoders' part names. diffusers loads the webui
file with `pipe.load_textual_inversion(path, token="pt-cat1")` (SDXL: once per encoder, with `state_dict["clip_l"]`
/ `["clip_g"]`). hcpdiff's visualizer also reads webui files from `emb_dir` as they are.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hcpdiff.cli import run_cli
from hcpdiff.errors import ModelError
from hcpdiff.models.embeddings import WEBUI_SDXL_KEYS, read_embedding, to_webui, write_embedding


def file_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file (a missing or unreadable file is one ModelError)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelError(f"'{path}' cannot be read as safetensors: {err}") from err


def encoder_parts(keys: list[str]) -> tuple[str, ...]:
    """The text encoders a file's keys (native or webui) are for: SDXL's two or SD's one."""
    if "text_encoder_2" in keys or set(WEBUI_SDXL_KEYS) <= set(keys):
        return ("text_encoder", "text_encoder_2")
    return ("text_encoder",)


def convert(src: str, dst: str, to_webui_layout: bool) -> Path:
    """Write `src`'s vectors to `dst` in the other layout; returns `dst`."""
    vectors = read_embedding(src, encoder_parts(file_keys(src)))
    name = Path(dst).stem
    if to_webui_layout:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        save_file({key: t.float().contiguous() for key, t in to_webui(vectors).items()}, dst,
                  metadata={"name": name, "source": str(src)})
        return Path(dst)
    return write_embedding(dst, vectors, {"name": name, "source": str(src)})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff.tools.embedding_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to_webui", metavar="PATH", help="an hcpdiff embedding file to write as a1111 / ComfyUI")
    way.add_argument("--from_webui", metavar="PATH", help="an a1111 / ComfyUI .safetensors to write as hcpdiff's")
    parser.add_argument("--dump_path", required=True, help="output file; its stem is the name used in prompts")
    args = parser.parse_args(argv)
    src = args.to_webui or args.from_webui
    if not str(src).endswith(".safetensors"):
        raise ModelError(f"'{src}': only .safetensors embeddings are read (a .pt / .bin file is a pickle that "
                         "can run code; convert it to safetensors in a trusted environment first)")
    out = convert(src, args.dump_path, bool(args.to_webui))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
