"""Models sharded by FSDP2 (``fully_shard``): what reading their weights outside forward needs.

Outside its forward a ``fully_shard`` module holds each parameter as a ``DTensor`` shard. A
module called on its own then (DFF's classifier head scoring concepts) must be given the full
tensors, and gathering one is a collective that every rank joins, in the same order: every rank
explains the same samples with the same methods, so they do.

Examples:
    >>> import torch
    >>> head = torch.nn.Linear(3, 2)
    >>> call_with_full_weights(head, torch.zeros(1, 3)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of an FSDP2 parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` (a collective), or ``tensor`` itself."""
    if is_sharded(tensor):
        whole: Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return whole
    return tensor


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward or backward that was not a
    training step's (its root keeps them for the backward it expects), so the next training
    forward gathers the current shards. Local to each rank; a no-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def call_with_full_weights(module: nn.Module, *args: Tensor) -> Tensor:
    """``module(*args)`` with its parameters and buffers gathered in full where sharded."""
    state = {name: full_tensor(p) for name, p in module.named_parameters()}
    state.update({name: full_tensor(b) for name, b in module.named_buffers()})
    out: Tensor = torch.func.functional_call(module, state, args)
    return out
