"""Block swap: keep some of a transformer's blocks in CPU memory and copy each to the accelerator just before it runs.

Only frozen parameters move (a block's trained LoRA or fine-tuned weights stay on the accelerator, so gradients and
optimizer state never change device). A swapped block's frozen weights live in a CPU master copy (pinned on CUDA);
before the block runs its parameters point at a fresh device copy, and afterwards back at the master, which frees
the device copy. Frozen weights never change, so nothing is ever copied back.

Forward: a block's pre-hook waits for its copy and starts the next swapped block's copy on a side stream (CUDA), so
the copy overlaps the block's compute; its hook parks it again. Backward: an identity autograd node on the block's
outputs brings the block back (and prefetches the one whose backward comes next) before any of the block's own
backward runs, with gradient checkpointing (the recomputation runs on the copy) or without (autograd's saved
weights are the parameters themselves, read through their current data).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _ReloadForBackward(torch.autograd.Function):
    """Identity on a block's outputs; its backward, which runs before the block's own, brings the block back."""

    @staticmethod
    def forward(ctx: Any, swapper: "BlockSwapper", index: int, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swapper, ctx.index = swapper, index
        return tuple(output.view_as(output) for output in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.swapper.before_backward(ctx.index)
        return (None, None, *grads)


class BlockSwapper:
    """Swap the frozen weights of `model`'s `blocks` (in execution order) between CPU memory and `device`.

    `swapped` of them (the last ones) live in CPU memory; the others are left where they are. Use `place(model)`
    instead of `model.to(device)`, so the swapped blocks are never copied to the device whole.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], swapped: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.swapped = list(range(len(self.blocks) - swapped, len(self.blocks)))
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # block index -> [(parameter, its CPU master)]
        self.masters: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        self.loaded: dict[int, Any] = {}  # block index -> the copy's CUDA event (None on a CPU)
        self.in_backward = False
        # each call of the whole model starts with every swapped block parked
        self.handles: list[Any] = [model.register_forward_pre_hook(lambda module, args: self.start_step())]
        for index in self.swapped:
            pairs = []
            for param in self.blocks[index].parameters():
                if param.requires_grad:
                    continue
                master = param.data.to("cpu")
                if self.cuda:
                    master = master.pin_memory()
                param.data = master
                pairs.append((param, master))
            self.masters[index] = pairs
            self.handles.append(self.blocks[index].register_forward_pre_hook(self._pre_hook(index)))
            self.handles.append(self.blocks[index].register_forward_hook(self._post_hook(index)))

    @property
    def swapped_params(self) -> set[int]:
        """ids of the parameters that live in CPU memory between uses."""
        return {id(param) for pairs in self.masters.values() for param, _ in pairs}

    def place(self, model: nn.Module) -> None:
        """`model.to(device)` for everything but the swapped blocks' frozen parameters."""
        keep = self.swapped_params
        for param in model.parameters():
            if id(param) not in keep:
                param.data = param.data.to(self.device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.device)

    def start_step(self) -> None:
        """A new forward pass of the whole model: every swapped block back in CPU memory."""
        self.in_backward = False
        for index in list(self.loaded):
            self.park(index)

    # --------------------------------------------------------------------------------------- moving
    def prefetch(self, index: int) -> None:
        """Start copying block `index`'s frozen weights to the device (on the side stream on CUDA)."""
        if index in self.loaded or index not in self.masters:
            return
        if not self.cuda:
            for param, master in self.masters[index]:
                param.data = master.to(self.device, copy=True)
            self.loaded[index] = None
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the copy's memory is free to write
        with torch.cuda.stream(self.copy_stream):
            for param, master in self.masters[index]:
                param.data = master.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.loaded[index] = event

    def load(self, index: int) -> None:
        """Block `index`'s weights on the device, ready for the compute stream."""
        self.prefetch(index)
        event = self.loaded[index]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for param, _ in self.masters[index]:
                param.data.record_stream(compute)  # freed only after the compute queued so far has used it
            self.loaded[index] = None

    def park(self, index: int) -> None:
        """Point block `index`'s frozen parameters back at their CPU masters (the device copy is freed)."""
        if self.loaded.pop(index, "absent") == "absent":
            return
        for param, master in self.masters[index]:
            param.data = master

    def resident(self, index: int) -> bool:
        """Whether block `index` is usable on the device now (always true for a block that is not swapped)."""
        return index not in self.masters or index in self.loaded

    # --------------------------------------------------------------------------------------- hooks
    def _neighbour(self, index: int, step: int) -> int | None:
        position = self.swapped.index(index) + step
        return self.swapped[position] if 0 <= position < len(self.swapped) else None

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            self.load(index)
            if not self.in_backward:  # a gradient-checkpointing recomputation runs in backward order
                following = self._neighbour(index, +1)
                if following is not None:
                    self.prefetch(following)
        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.in_backward:  # a recomputation: the backward about to run needs the weights
                return None
            self.park(index)
            outputs = output if isinstance(output, tuple) else (output,)
            if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad
                                                      for t in outputs):
                return None
            # only tensors that need a gradient pass through the reload node
            positions = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            passed = _ReloadForBackward.apply(self, index, *(outputs[i] for i in positions))
            replaced = list(outputs)
            for i, tensor in zip(positions, passed):
                replaced[i] = tensor
            return tuple(replaced) if isinstance(output, tuple) else replaced[0]
        return hook

    def before_backward(self, index: int) -> None:
        """Block `index`'s backward comes next: load it, prefetch the one before it, and park all but these and the
        block whose backward just ran."""
        self.in_backward = True
        previous, following = self._neighbour(index, -1), self._neighbour(index, +1)
        for other in list(self.loaded):
            if other not in (index, previous, following):
                self.park(other)
        self.load(index)
        if previous is not None:
            self.prefetch(previous)

    def remove(self) -> None:
        """Unhook and leave every swapped block in CPU memory."""
        self.start_step()
        for handle in self.handles:
            handle.remove()
