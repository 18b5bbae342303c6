"""The dataset a family's shipped training config trains on in the tests that run every registered family (the contract,
resume): make_demo_data's images and captions, and for an editing family its (input image, instruction, image) rows.
Test helper, imported as `from family_data import ...` (a plain module, not conftest)."""
from __future__ import annotations

from pathlib import Path

from hcpdiff.families import Family
from hcpdiff.tools.make_demo_data import make_demo_data


def family_dataset(family: Family, folder: Path, num: int, condition_area: int = 64 * 64) -> tuple[Path, list[str]]:
    """(the data folder, the training overrides that read it): `num` demo images with their captions; an editing
    family's rows (make_demo_data's `edit` captions: input/<i>.png, "make the circle red") with its input images at
    `condition_area` pixels (its pipeline's 1024x1024 takes the tiny VAE ~2 s an image on a CPU). A video family
    trains on the images as 1-frame clips."""
    edits = family.condition_images > 0
    data = make_demo_data(folder, num=num, captions="edit" if edits else "txt")
    overrides = [f"data.dataset1.source.data_source1.img_root={data}",
                 f"data.dataset1.source.data_source1.caption_file={data}",
                 *([f"model.condition_area={condition_area}"] if edits else [])]
    return data, overrides
