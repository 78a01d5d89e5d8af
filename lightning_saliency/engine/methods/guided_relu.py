"""Guided backpropagation that works for ``nn.ReLU``, ``F.relu``, ``torch.relu`` and in-place ReLUs.

Why our own: pytorch-grad-cam's ``GuidedBackpropReLUModel`` swaps ``nn.ReLU`` modules only (a
functional ``F.relu`` is missed), returns image 0 of a batch and accumulates into the caller's
gradient; captum's ``GuidedBackprop`` hooks ``nn.ReLU`` modules only. A ``TorchFunctionMode``
sees every ReLU call, whatever spelling the model uses.

Each ReLU call is replaced by :class:`_SwitchableReLU`, whose *backward* reads the mode's
``guided`` flag. So one forward serves both the plain gradient (Grad-CAM) and the guided one:
backpropagate once with ``guided=False`` (exactly ReLU's own gradient), then with ``guided=True``.
The ``deconv`` flag gives the deconvolution rule the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _Switch:
    """Holds the flags the backward pass reads: ``guided`` (ReLU's gradient, then only its
    positive part) or ``deconv`` (the positive part of the incoming gradient, whatever the
    forward's sign: Zeiler and Fergus's deconvnet)."""

    def __init__(self) -> None:
        self.guided = False
        self.deconv = False


class _SwitchableReLU(torch.autograd.Function):
    """ReLU itself (not a wrapper of its result, so the deconv rule is not masked again by
    ReLU's own backward), with the backward the switch says."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, switch: _Switch) -> Tensor:
        ctx.switch = switch
        output = source.clamp(min=0)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (output,) = ctx.saved_tensors
        if ctx.switch.deconv:
            return grad.clamp(min=0), None
        grad = grad * (output > 0)
        if ctx.switch.guided:
            grad = grad.clamp(min=0)
        return grad, None


class _SwitchableReLUInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, output: Tensor, switch: _Switch) -> Tensor:
        ctx.switch = switch
        output.clamp_(min=0)
        ctx.mark_dirty(output)
        ctx.save_for_backward(output)
        return output

    backward = _SwitchableReLU.backward


_RELU_CALLS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu_}
_INPLACE_CALLS = {torch.relu_, Tensor.relu_, F.relu_}


class GuidedReLUMode(TorchFunctionMode):
    """Route every ReLU of a forward pass through a switchable backward.

    Examples:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> with GuidedReLUMode() as mode:
        ...     y = F.relu(x, inplace=False)
        >>> mode.switch.guided = True
        >>> torch.autograd.grad((y * torch.tensor([3.0, -4.0])).sum(), x)[0]
        tensor([0., 0.])
        >>> mode.relu_calls
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.switch = _Switch()
        self.relu_calls = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _RELU_CALLS:
            return func(*args, **kwargs)
        inplace = func in _INPLACE_CALLS or bool(kwargs.get("inplace", args[1:2] == (True,)))
        source = args[0]
        if not isinstance(source, Tensor) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if inplace and source.requires_grad:
            # In-place callers may ignore the return value: the tensor itself gets our backward.
            self.relu_calls += 1
            return _SwitchableReLUInplace.apply(source, self.switch)
        if not source.requires_grad:
            return func(*args, **kwargs)
        self.relu_calls += 1
        return _SwitchableReLU.apply(source, self.switch)
