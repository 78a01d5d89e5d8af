"""captum's gradient family: Saliency, InputXGradient, GuidedBackprop, Deconvolution, DeepLift
and GradientShap, each a map summed over channels.

- ``saliency`` and ``input_x_gradient`` call captum as it is (``Saliency`` with its default
  ``abs=True``, so non-negative; ``InputXGradient``, signed). captum takes input gradients with
  ``torch.autograd.grad``: nothing reaches the parameters.
- ``deeplift`` calls captum's ``DeepLift`` (rescale rule, zero baseline). captum applies its
  rule to nonlinearities that are modules (``nn.ReLU``); a model that calls ``F.relu`` would get
  a silently wrong map, so such a model is refused with the reason.
- ``guided_backprop`` and ``deconvolution`` are our own, on the ReLU switch of
  :mod:`~lightning_saliency.engine.methods.guided_relu`: captum hooks ``nn.ReLU`` modules only and
  misses ``F.relu``, ``torch.relu`` and ``Tensor.relu``. They equal captum on models built of
  ``nn.ReLU`` modules (``tests/test_gradient_methods.py``).
- ``gradient_shap`` is our own: captum draws its baselines, path points and noise from the
  global RNGs (numpy's and torch's) for the whole batch, so a sample's map depended on its
  neighbours. Here one draw of ``samples`` (path point, baseline, noise) triples from a private
  generator serves every image; on the same draw it equals captum's ``GradientShap``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import DeepLift, InputXGradient, Saliency
from torch import Tensor, nn

from lightning_saliency.engine.methods.base import NoOptions, register_input_method
from lightning_saliency.engine.methods.guided_relu import GuidedReLUMode
from lightning_saliency.engine.methods.integrated_gradients import (
    PathGradients,
    chunk_sizer,
    make_baseline,
)
from lightning_saliency.engine.methods.session import ExplainSession
from lightning_saliency.engine.methods.smoothgrad import NoiseOptions, noisy_copies
from lightning_saliency.errors import SaliencyConfigError


class _Explained(nn.Module):
    """The model with the session's explained score as its output, for captum methods that
    need a module (DeepLift hooks the model's submodules)."""

    def __init__(self, model: nn.Module, forward: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, x: Tensor, *extra: Tensor) -> Tensor:
        return self._forward(x, *extra)


def _captum(session: ExplainSession, method: Any, **kwargs: Any) -> Tensor:
    forward, target, extra = session.captum_forward()
    attr: Tensor = method(forward).attribute(
        session.images.detach().clone().requires_grad_(True),
        target=target,
        additional_forward_args=extra or None,
        **kwargs,
    )
    return attr.detach().float().sum(dim=1)


def saliency(session: ExplainSession, _options: NoOptions) -> Tensor:
    """captum's ``Saliency``: the absolute input gradient (Simonyan et al.)."""
    return _captum(session, Saliency)


def input_x_gradient(session: ExplainSession, _options: NoOptions) -> Tensor:
    """captum's ``InputXGradient``: input times its gradient, signed."""
    return _captum(session, InputXGradient)


def _relu_use(session: ExplainSession) -> tuple[int, list[str]]:
    """In one forward of an image: the ReLU calls that are not ``nn.ReLU`` modules, and the
    ``nn.ReLU`` modules called more than once (captum's DeepLift handles neither)."""
    modules = {n: m for n, m in session.model.named_modules() if isinstance(m, nn.ReLU)}
    calls = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        def count(*_: Any) -> None:
            calls[name] += 1

        return count

    handles = [m.register_forward_hook(counter(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad(), GuidedReLUMode() as mode:  # it counts where gradients flow
            session.model(session.images[:1].detach().clone().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    return int(mode.relu_calls) - sum(calls.values()), [n for n, c in calls.items() if c > 1]


def deeplift(session: ExplainSession, _options: NoOptions) -> Tensor:
    """captum's ``DeepLift`` (rescale rule) against a zero baseline, signed."""
    functional, reused = _relu_use(session)
    model = type(session.model).__name__
    if functional > 0:
        raise SaliencyConfigError(
            f"deeplift: {model} calls ReLU as a function ({functional} call(s) of F.relu / "
            "torch.relu), which captum's DeepLift cannot see, so its map would be wrong. Use "
            "nn.ReLU modules in the model, or choose integrated_gradients (the same question, "
            "answered along a path)."
        )
    if reused:
        raise SaliencyConfigError(
            f"deeplift: {model} calls the same nn.ReLU module more than once ({reused[0]}"
            f"{' and others' if len(reused) > 1 else ''}; torchvision's ResNet blocks do), "
            "which captum's DeepLift cannot handle. Give each use its own nn.ReLU, or choose "
            "integrated_gradients."
        )
    forward, target, extra = session.captum_forward()
    wrapped = _Explained(session.model, forward)
    with warnings.catch_warnings():  # captum's note that it hooks (and unhooks) nonlinearities
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
        attr: Tensor = DeepLift(wrapped).attribute(
            session.images.detach().clone().requires_grad_(True),
            baselines=0.0,
            target=target,
            additional_forward_args=extra or None,
        )
    return attr.detach().float().sum(dim=1)


def relu_rule_gradient(session: ExplainSession, rule: str) -> Tensor:
    """The input gradient of the explained score with every ReLU's backward replaced by
    ``rule`` (``"guided"`` or ``"deconv"``), ``(N, C, H, W)``."""
    x = session.images.detach().clone().requires_grad_(True)
    with torch.enable_grad(), GuidedReLUMode() as mode:
        output = session.model(x)
    if mode.relu_calls == 0:
        warnings.warn(
            f"{type(session.model).__name__} has no ReLU: the {rule} rule changes nothing, so "
            "this map is the plain input gradient.",
            stacklevel=4,
        )
    mode.switch.guided = rule == "guided"
    mode.switch.deconv = rule == "deconv"
    score = session._target_of_output(output).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad.detach().float()


def guided_backprop(session: ExplainSession, _options: NoOptions) -> Tensor:
    """Guided backpropagation (Springenberg et al.), signed."""
    return relu_rule_gradient(session, "guided").sum(dim=1)


def deconvolution(session: ExplainSession, _options: NoOptions) -> Tensor:
    """Deconvolution (Zeiler and Fergus), signed."""
    return relu_rule_gradient(session, "deconv").sum(dim=1)


@dataclass(frozen=True)
class GradientShapOptions(NoiseOptions):
    """Options of ``gradient_shap``.

    Attributes:
        samples: (path point, baseline, noise) draws per image (captum's ``n_samples``).
        noise: noise standard deviation as a share of each image's value range (captum's
            ``stdevs``, default 0).
        baselines: ``None`` (zeros: the mean image for normalised inputs), a number (a
            constant image) or a tensor ``(B, C, H, W)`` of reference images to draw from.
        internal_batch_size: rows per pass; ``None``: sized to the device, as IG.
        seed: the draws' seed; ``None``: ``explain()``'s ``seed``.
    """

    noise: float = 0.0
    baselines: float | Tensor | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.baselines, Tensor) and self.baselines.dim() != 4:
            raise ValueError(f"baselines must be (B, C, H, W), got {tuple(self.baselines.shape)}")


def gradient_shap_draws(
    samples: int, baselines: int, seed: int
) -> tuple[Tensor, Tensor, torch.Generator]:
    """Path points ``(samples,)`` in [0, 1) and baseline choices ``(samples,)``, from a private
    generator (which then draws the noise)."""
    generator = torch.Generator().manual_seed(int(seed))
    alphas = torch.rand(samples, generator=generator, dtype=torch.float64)
    choice = torch.randint(baselines, (samples,), generator=generator)
    return alphas, choice, generator


def gradient_shap(session: ExplainSession, options: GradientShapOptions) -> Tensor:
    """GradientShap: ``(x' - b) * grad(b + alpha (x' - b))`` averaged over draws of a path point
    ``alpha``, a baseline ``b`` and a noisy input ``x'``, signed, channel sum."""
    images = session.images
    n, s = images.shape[0], options.samples
    given = options.baselines
    pool = given if isinstance(given, Tensor) else make_baseline(images[:1], given)
    pool = pool.to(images.device, images.dtype)
    seed = session.seed if options.seed is None else options.seed
    alphas, choice, generator = gradient_shap_draws(s, pool.shape[0], seed)
    noise = torch.randn((s, *images.shape[1:]), generator=generator)
    noisy, origin = noisy_copies(images, noise, options.noise)  # row s * n + i: draw s, image i
    bases = pool[choice.to(images.device)].repeat_interleave(n, dim=0)
    path = PathGradients(session, noisy, bases, chunk_sizer(options, images), origin=origin)
    total = torch.zeros(images.shape, device=images.device, dtype=torch.float32)

    def accumulate(rows: slice, grads: Tensor) -> Tensor:
        diff = (noisy[rows] - bases[rows]).float()
        total.index_add_(0, origin[rows], diff * grads.float())
        return grads.new_zeros(0)

    rows = torch.arange(n * s, device=images.device)
    path.evaluate(rows, alphas.repeat_interleave(n).to(images.device).float(), accumulate)
    return (total / s).sum(dim=1)


register_input_method(
    "saliency",
    saliency,
    "Saliency (Simonyan et al., captum): the absolute input gradient.",
    signed=False,
    aliases=("vanilla_gradient",),
)
register_input_method(
    "input_x_gradient",
    input_x_gradient,
    "Input x Gradient (captum): the input times its gradient, signed.",
    signed=True,
)
register_input_method(
    "guided_backprop",
    guided_backprop,
    "Guided Backprop (Springenberg et al.): ReLU gradients kept where positive, signed.",
    signed=True,
)
register_input_method(
    "deconvolution",
    deconvolution,
    "Deconvolution (Zeiler and Fergus): the positive part of each ReLU's gradient, signed.",
    signed=True,
    aliases=("deconvnet",),
)
register_input_method(
    "deeplift",
    deeplift,
    "DeepLift (Shrikumar et al., captum, rescale rule): contributions against a zero baseline.",
    signed=True,
    passes="2F + 1B",
)
register_input_method(
    "gradient_shap",
    gradient_shap,
    "GradientShap (Lundberg and Lee): expected gradients x (input - baseline) over random "
    "baselines and path points, signed.",
    signed=True,
    options=GradientShapOptions,
    cost="moderate",
    passes="samples x (1F + 1B)",
    aliases=("gradientshap",),
)
