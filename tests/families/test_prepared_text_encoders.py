"""Every family's conditioner encodes the same prompts through DDP-wrapped text encoders (how a run with a text-encoder
LoRA hands them over under several processes) as through the plain ones. FLUX's and SD3's pipelines read `.dtype`
from their encoders, which a DDP wrapper lacks: an AttributeError before the encoders were handed over as
`PreparedTextEncoder`s."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hcpdiff.errors import ConfigError
from hcpdiff.families import FAMILIES
from hcpdiff.models import load_model_parts

PROMPTS = ["a red circle", "a blue square on a white table"]


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, so DistributedDataParallel can wrap modules here."""
    store = dist.HashStore()  # one process: no port, no rendezvous
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_wrapped_text_encoders_encode_as_the_plain_ones(family, process_group, tmp_path):
    parts = load_model_parts(str(family.make_tiny(tmp_path / "model", seed=0)))
    cpu = torch.device("cpu")
    batch = {"pixel_values": torch.zeros(len(PROMPTS), 3, 64, 64)}  # SDXL's time ids read the image size
    condition = {}
    if family.condition_images:  # an editing family's encoder also reads the input images (small ones here)
        batch["condition_pixels"] = torch.rand(len(PROMPTS), family.condition_images, 3, 64, 64) * 2 - 1
        condition = {"condition_area": 64 * 64}
    conditioner = family.build_conditioner(parts.components, 1, 0, **condition)
    with torch.no_grad():
        plain = conditioner(PROMPTS, batch, cpu)
    for index, part in enumerate(family.text_encoders):
        encoder = parts.components.get(part)
        if encoder is not None:
            try:
                conditioner.set_text_encoder(DistributedDataParallel(encoder.requires_grad_(True)), index)
            except ConfigError as err:  # a family whose pipeline runs the encoder past the wrapper refuses it in
                assert "one process" in str(err)  # one line (Ideogram 4: its text-encoder LoRA trains in one process)
                return
    with torch.no_grad():
        wrapped = conditioner(PROMPTS, batch, cpu)
    assert flat(plain).keys() == flat(wrapped).keys()
    for key, value in flat(plain).items():
        assert torch.equal(value, flat(wrapped)[key]) if torch.is_tensor(value) else value == flat(wrapped)[key], key


def flat(conditioning: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{"a.b": tensor} from nested dicts (SDXL's added_cond_kwargs)."""
    out = {}
    for key, value in conditioning.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
