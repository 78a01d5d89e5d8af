"""Every buffer of a model put back after the callback's forwards: :func:`buffers_kept`.

Eval mode does not stop every forward from writing state. Quantization-aware training's
fake-quant observers update their ranges in eval mode too (``prepare_qat``), and a model may
count or average what its forward sees in a buffer of its own. The explanations, the shortcut
probes, the faithfulness test and the setup dry run all run forwards on images the model never
trains on (IG's dark path images among them), so without this the weights that
``convert()`` deploys, and the next training step, would depend on the callback.

Why our own: neither captum nor pytorch-grad-cam touches module state (they leave it to the
caller), and ``torch.ao`` offers ``disable_observer`` for its own observers only. A snapshot of
every buffer, restored in place, holds for any module.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> class Counting(nn.Linear):
    ...     def __init__(self):
    ...         super().__init__(2, 2)
    ...         self.register_buffer("calls", torch.zeros(()))
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         return super().forward(x)
    >>> net = Counting()
    >>> with buffers_kept(net):
    ...     _ = net(torch.zeros(1, 2)); _ = net(torch.zeros(1, 2))
    >>> net.calls.item()
    0.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Inside, the model's forwards may write its buffers; on exit (also after an error)
    every buffer holds exactly what it held before: the same tensor object registered under
    each name, with its old shape (observers resize theirs), dtype and values. Buffers are
    small next to the parameters, so the copy is cheap; parameters are not copied (a forward
    does not write them, and no gradient reaches them)."""
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                saved.append((module, name, buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, copy in saved:
                module._buffers[name] = buffer
                if buffer.shape != copy.shape:
                    buffer.resize_(copy.shape)
                buffer.copy_(copy)
