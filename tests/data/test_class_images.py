"""Prior preservation's class folder: what counts as present, which indices a short folder renders, config checks."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from hcpdiff.data.class_images import ClassImagePlan, GenerateSpec, plan_class_images, render_class_images
from hcpdiff.errors import ConfigError


def dataset(img_root: Path | None, **generate) -> dict:
    source = {} if img_root is None else {"img_root": str(img_root)}
    return {"source": {"s": source}, "bucket": {}, "generate": {"prompt": "a photo of a dog", **generate}}


def test_images_of_any_name_count_and_the_lowest_free_indices_fill_the_gap(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("mine.jpg", "00001.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "00000.txt").write_text("a caption left by a killed run")  # no image: index 0 is still missing
    (folder / ".00002.png.part").write_bytes(b"half")  # a killed write is not an image
    (plan,) = plan_class_images({"reg": dataset(folder, num=4)})
    assert (plan.key_path, plan.present, plan.missing) == ("data.reg.generate", 2, [0, 2])
    (full,) = plan_class_images({"reg": dataset(folder, num=2)})
    assert full.missing == []
    assert plan_class_images({"dataset1": {"source": {}, "bucket": {}}}) == []


def test_missing_folder_is_created(tmp_path):
    (plan,) = plan_class_images({"reg": dataset(tmp_path / "a" / "b", num=2)})
    assert plan.folder.is_dir() and plan.missing == [0, 1]


class FakeFamily:
    def __init__(self):
        self.encoded = []

    def pipeline_call_args(self, args):
        return args

    def prompt_args(self, pipe, prompts, neg_prompts, *, clip_skip, all_prompts):
        self.encoded.append(len(prompts))
        return {"prompt": prompts}


class FakePipe:
    """Records each call's seeds; 'renders' an image whose color is its generator's first draw."""

    def __init__(self):
        self.seeds = []

    def __call__(self, prompt, generator, output_type, **sampling):
        seeds = [g.initial_seed() for g in generator]
        self.seeds.append(seeds)
        return type("Out", (), {"images": [Image.new("RGB", (4, 4), (seed % 256, 0, 0)) for seed in seeds]})


def test_each_process_renders_its_share_with_per_index_seeds(tmp_path):
    """Ranks 0 and 1 of 2 take every other missing index; image i always renders from seed + i, in any batch."""
    spec = GenerateSpec(prompt="a dog", num=5, seed=10, batch_size=2)
    plan = ClassImagePlan("data.reg.generate", tmp_path, spec, 0, [0, 1, 2, 4])
    family, pipe = FakeFamily(), FakePipe()
    done = []
    written = render_class_images(plan, pipe, family, rank=1, num_replicas=2, progress=done.append)
    assert [p.name for p in written] == ["00001.png", "00004.png"] and pipe.seeds == [[11, 14]] and done == [2]
    render_class_images(plan, pipe, family, rank=0, num_replicas=2)
    assert pipe.seeds[1] == [10, 12] and family.encoded == [2, 2]
    names = [f"0000{i}.{ext}" for i in (0, 1, 2, 4) for ext in ("png", "txt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert (tmp_path / "00004.txt").read_text() == "a dog\n"
    assert Image.open(tmp_path / "00004.png").getpixel((0, 0)) == (14, 0, 0)


@pytest.mark.parametrize("node, message", [
    (dataset(None, num=3), "data.reg.source.s.img_root: not set"),
    ({**dataset(Path("x"), num=3), "source": {"a": {"img_root": "x"}, "b": {"img_root": "y"}}},
     "give data.reg.source exactly one source"),
    ({**dataset(Path("x"), num=3), "source": {"s": {"img_root": "x", "caption_file": "caps.json"}}},
     "data.reg.source.s.caption_file: data.reg.generate writes each image's caption as <name>.txt"),
    (dataset(Path("x")), "`data.reg.generate.num`: required key is missing"),
    (dataset(Path("x"), num=3, width=0), "`data.reg.generate.width`:"),
])
def test_config_problems_name_the_key(tmp_path, node, message):
    with pytest.raises(ConfigError) as err:
        plan_class_images({"reg": node})
    assert message in str(err.value)


def test_a_run_that_cannot_render_names_the_short_folder(tmp_path):
    from hcpdiff.train.class_images import generate_class_images

    with pytest.raises(ConfigError, match=r"^data\.reg\.generate: 2 class images to render in .*, which an FSDP run"):
        generate_class_images({"reg": dataset(tmp_path / "class", num=2)}, None, None,
                              cannot_render="an FSDP run does not do")
