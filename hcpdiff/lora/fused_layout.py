"""LoRAs of an original ("fused") layout, where one layer stacks the outputs of several diffusers layers.

BFL's FLUX (and SD3's original MMDiT) compute q, k and v with one `qkv` Linear, and a FLUX single block computes q, k,
v and the MLP input with one `linear1`; diffusers splits each into separate layers. A LoRA on the separate layers
fuses into one LoRA on the stacked layer exactly: with piece i's `B_i A_i` scaled by `s_i = alpha_i / r_i`,

    [s_1 B_1 A_1; s_2 B_2 A_2; ...] = s * blockdiag(B_1', B_2', ...) @ [A_1; A_2; ...]

so the fused `lora_down` stacks the A's (rank = the sum of ranks), `lora_up` is block-diagonal, and alpha is chosen
so that alpha / rank is the pieces' common scale (when the scales differ, each is folded into its B block and the
fused scale is 1). A piece without a LoRA is a zero block. Back, a stacked LoRA's `up @ down` split by output rows
is exactly one LoRA per piece (up rows split, down shared); when its up is block-diagonal (as written here), each
piece keeps only its own rank columns, which gives back the pieces that were fused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from hcpdiff.errors import ModelError
from hcpdiff.lora.state_io import layer_kind, layer_states

ADAPTER_NAMES = {"lora": "a DoRA", "loha": "a LoHa", "lokr": "a LoKr"}  # the adapters that are not a plain LoRA


@dataclass(frozen=True)
class FusedLayer:
    """One layer of an original layout and the diffusers layers whose outputs it stacks, in row order.

    `width_ratios[i]` is piece i's output width over the layer's input width (FLUX: q, k, v 1 each, the MLP 4), so
    a piece without a LoRA gets a zero block of the right height. `swap_halves`: the two output halves are in the
    other order (BFL's final adaLN gives (shift, scale), diffusers' (scale, shift)). A one-piece layer without a
    swap is a plain rename and carries any adapter type; the others carry plain LoRA only.
    """

    name: str
    pieces: tuple[str, ...]
    width_ratios: tuple[int, ...] = (1,)
    swap_halves: bool = False

    @property
    def is_rename(self) -> bool:
        return len(self.pieces) == 1 and not self.swap_halves


Lookup = Callable[[str], "tuple[FusedLayer, int] | None"]  # diffusers layer -> (its fused layer, piece index)


def is_plain_lora(parts: dict[str, torch.Tensor]) -> bool:
    """Whether one layer's native tensors are a plain LoRA (not LoHa / LoKr / DoRA)."""
    return layer_kind(parts) == "lora" and ".lora_magnitude_vector.weight" not in parts


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The two halves of the output rows in the other order (its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_lora(layer: FusedLayer, pieces: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """The native LoRA tensors of `layer` from its pieces' (None: a piece without LoRA, a zero block)."""
    present = [(i, parts) for i, parts in enumerate(pieces) if parts is not None]
    in_features = {parts[".lora_A.weight"].shape[1] for _, parts in present}
    if len(in_features) != 1:
        raise ModelError(f"layers {', '.join(layer.pieces[i] for i, _ in present)} fuse into '{layer.name}' but take "
                         f"inputs of different widths {sorted(in_features)}.")
    (width,) = in_features
    widths = [ratio * width for ratio in layer.width_ratios]
    for i, parts in present:
        if parts[".lora_B.weight"].shape[0] != widths[i]:
            raise ModelError(f"layer '{layer.pieces[i]}' has {parts['.lora_B.weight'].shape[0]} outputs; as part "
                             f"{i + 1} of '{layer.name}' it must have {widths[i]}.")
    scales = [float(parts[".alpha"]) / parts[".lora_A.weight"].shape[0] for _, parts in present]
    same_scale = len(set(scales)) == 1
    dtype = present[0][1][".lora_B.weight"].dtype
    for _, parts in present[1:]:
        dtype = torch.promote_types(dtype, parts[".lora_B.weight"].dtype)
    down = torch.cat([parts[".lora_A.weight"].to(dtype) for _, parts in present])
    up = torch.zeros(sum(widths), down.shape[0], dtype=dtype)
    column = 0
    for (i, parts), scale in zip(present, scales):
        rank = parts[".lora_A.weight"].shape[0]
        block = parts[".lora_B.weight"] if same_scale else parts[".lora_B.weight"].to(torch.float32) * scale
        up[sum(widths[:i]): sum(widths[: i + 1]), column: column + rank] = block.to(dtype)
        column += rank
    rank = down.shape[0]
    alpha = scales[0] * rank if same_scale else float(rank)  # alpha / rank: the common scale, or 1 once folded
    if layer.swap_halves:
        up = swap_halves(up)
    return {".lora_A.weight": down, ".lora_B.weight": up, ".alpha": torch.tensor(alpha)}


def split_lora(layer: FusedLayer, parts: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor] | None]:
    """The pieces' native LoRAs of a LoRA on `layer` (None: a piece whose rows the LoRA leaves at zero), exactly."""
    down, up, alpha = parts[".lora_A.weight"], parts[".lora_B.weight"], float(parts[".alpha"])
    if layer.swap_halves:
        up = swap_halves(up)
    widths = [ratio * down.shape[1] for ratio in layer.width_ratios]
    if sum(widths) != up.shape[0]:
        raise ModelError(f"'{layer.name}' has {up.shape[0]} outputs for {down.shape[1]} inputs; its pieces "
                         f"({', '.join(layer.pieces)}) need {' + '.join(map(str, widths))}.")
    rows = list(up.split(widths))
    if len(rows) == 1 or not bool(up.any()):  # one piece (a reordering), or an untrained (zero) LoRA: keep it whole
        return [{".lora_A.weight": down.clone(), ".lora_B.weight": block.clone(), ".alpha": torch.tensor(alpha)}
                for block in rows]
    columns = [block.any(dim=0).nonzero().flatten() for block in rows]
    used = torch.cat(columns)
    compact = used.numel() == used.unique().numel()  # block-diagonal: each rank column feeds one piece only
    pieces: list[dict[str, torch.Tensor] | None] = []
    for block, own in zip(rows, columns):
        if own.numel() == 0:
            pieces.append(None)
        elif compact:  # alpha / rank stays the scale with the piece's own rank
            pieces.append({".lora_A.weight": down[own].clone(), ".lora_B.weight": block[:, own].clone(),
                           ".alpha": torch.tensor(alpha * own.numel() / down.shape[0])})
        else:
            pieces.append({".lora_A.weight": down.clone(), ".lora_B.weight": block.clone(),
                           ".alpha": torch.tensor(alpha)})
    return pieces


def native_to_fused(state: dict[str, torch.Tensor], lookup: Lookup, part: str) -> dict[str, dict[str, torch.Tensor]]:
    """{fused layer name: its native tensors} of a native state; a layer the layout cannot hold (no such layer in
    it, or a LoHa / LoKr / DoRA that would have to fuse) is one ModelError naming it and how many more there are."""
    groups: dict[str, tuple[FusedLayer, list[dict[str, torch.Tensor] | None]]] = {}
    problems: list[str] = []
    for name, parts in layer_states(state).items():
        found = lookup(name)
        if found is None:
            problems.append(f"{part} layer '{name}' has no counterpart in the original layout")
            continue
        layer, index = found
        if not layer.is_rename and not is_plain_lora(parts):
            what = (f"fuses with {', '.join(p for p in layer.pieces if p != name)} into" if len(layer.pieces) > 1
                    else "has its output rows reordered as")
            problems.append(f"{part} layer '{name}' is {ADAPTER_NAMES[layer_kind(parts)]}, and in the original layout "
                            f"it {what} '{layer.name}', which only a plain LoRA can do exactly (hcpdiff.visualizer "
                            "renders it as trained)")
            continue
        groups.setdefault(layer.name, (layer, [None] * len(layer.pieces)))[1][index] = parts
    if problems:
        more = f" ({len(problems)} layers cannot be written)" if len(problems) > 1 else ""
        raise ModelError(f"{problems[0]}{more}; nothing was written.")
    return {name: (pieces[0] if layer.is_rename else fuse_lora(layer, pieces))
            for name, (layer, pieces) in groups.items()}


def fused_to_native(by_layer: dict[str, dict[str, torch.Tensor]], layers: Iterable[FusedLayer],
                    part: str) -> dict[str, torch.Tensor]:
    """A native state from {fused layer name: its native tensors}, each split into its pieces (`layers` gives the
    layout's FusedLayer of each name)."""
    known = {layer.name: layer for layer in layers}
    state: dict[str, torch.Tensor] = {}
    for name, parts in by_layer.items():
        layer = known[name]
        if layer.is_rename:
            state.update({layer.pieces[0] + suffix: tensor for suffix, tensor in parts.items()})
            continue
        if not is_plain_lora(parts):
            raise ModelError(f"{part} layer '{name}' is {ADAPTER_NAMES[layer_kind(parts)]}, which cannot be split "
                             f"exactly into {', '.join(layer.pieces)}; only a plain LoRA can.")
        for piece, piece_parts in zip(layer.pieces, split_lora(layer, parts)):
            if piece_parts is not None:
                state.update({piece + suffix: tensor for suffix, tensor in piece_parts.items()})
    return state
