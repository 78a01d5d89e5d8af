"""Relevance propagation for transformers by the conservative rules of Ali et al. (ICML 2022,
"XAI for Transformers: Better Explanations through Conservative Propagation"):

- attention heads (their AH rule): each block's attention probabilities are held constant, so
  relevance flows through the values only, never back through the softmax;
- layer norm (their LN rule): the normalisation (the standard deviation) is held constant, so a
  layer norm is a linear map for relevance;
- every other layer by LRP-0, which for linear maps and the MLP equals gradient x input.

A pixel's relevance is then its value times the gradient of the explained score in that
modified backward, summed over the colour channels (signed: negative pixels speak against the
class). Both rules are detachments in one forward: hooks replay each attention with its
probabilities detached (:func:`~lightning_saliency.engine.attention.attention_pass`) and each
``nn.LayerNorm``'s output with its standard deviation detached. The values are the model's own
(checked, else an error), nothing is patched, and the hooks are gone after.

Left out: AttnLRP (Achtibat et al., ICML 2024). Hooks could apply its rules without patching
the model too (as here, and as ``transformer_attribution`` applies Chefer et al.'s), but it
needs a rule of its own for softmax, the attention's bilinear products and GELU, and a
reference run to test them against; these rules are the two detachments above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_saliency.engine.attention import attention_pass
from lightning_saliency.engine.methods.base import MethodOptions, register_input_method
from lightning_saliency.engine.methods.session import ExplainSession
from lightning_saliency.errors import SaliencyConfigError


def constant_norm(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """``module(x)`` with the standard deviation detached: the same values, a linear map for
    the gradient.

    Examples:
        >>> norm = nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(constant_norm(norm, x), norm(x), atol=1e-6)
        True
    """
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    scale = (x.var(dims, keepdim=True, unbiased=False) + module.eps).sqrt()
    out = centred / scale.detach()
    if module.weight is not None:
        out = out * module.weight
    if module.bias is not None:
        out = out + module.bias
    return out


@contextlib.contextmanager
def constant_norms(model: nn.Module) -> Iterator[None]:
    """Every ``nn.LayerNorm`` of ``model`` gives :func:`constant_norm`'s output while inside;
    a norm whose output is not that (another normalisation under the name) is an error."""

    def hold(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        assert isinstance(module, nn.LayerNorm)
        held = constant_norm(module, args[0])
        if not torch.allclose(held, output, rtol=1e-3, atol=1e-4):
            raise SaliencyConfigError(
                f"{type(module).__name__} does not compute a layer norm of its input; the "
                "layer-norm rule cannot hold its normalisation constant."
            )
        return held

    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    handles = [m.register_forward_hook(hold) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def transformer_lrp(session: ExplainSession, _options: MethodOptions) -> Tensor:
    """Gradient x input through a backward that holds attention and layer norms constant."""
    x = session.images.detach().clone().requires_grad_(True)
    with constant_norms(session.model):
        found = attention_pass(session.model, x, constant_attention=True)
    score = session.explained_scores(found.output).sum()
    (grad,) = torch.autograd.grad(score, x)
    return (x.detach() * grad).float().sum(1)


register_input_method(
    "transformer_lrp",
    transformer_lrp,
    "Relevance propagation with the conservative rules of Ali et al. (ICML 2022): attention "
    "and layer norms held constant, gradient x input (transformers).",
    signed=True,
    passes="1F + 1B",
    needs_attention=True,
    location_alarms=False,
    aliases=("conservative_lrp",),
)
