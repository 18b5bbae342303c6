"""Gradient checkpointing that still lets LoRA inside a frozen model receive gradients."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant checkpointing for a diffusers or transformers model.

    Reentrant checkpointing gives no gradient to adapters whose block inputs do not require grad
    (a frozen text encoder's embeddings), so their LoRA weights would never move.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if isinstance(model, ModelMixin):
        model.enable_gradient_checkpointing()  # diffusers uses use_reentrant=False by default
    elif isinstance(model, PreTrainedModel):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"gradient checkpointing needs a diffusers or transformers model, got {type(model).__name__}")


def checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Selective checkpointing: each of `blocks` keeps only its inputs for backward and recomputes the rest there
    (non-reentrant, like the model-wide switch); the model's other blocks run plainly. The block's `forward` is
    wrapped on the instance, so hooks (block swap's) and state-dict keys are unchanged."""
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
