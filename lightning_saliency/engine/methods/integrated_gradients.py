"""Integrated Gradients on the device: one engine for fixed step counts and for ``"auto"``.

Why our own: captum's ``IntegratedGradients`` (the reference in the tests, equal to 1e-4) cannot
reuse gradient evaluations from one step count to the next, so ``"auto"`` recomputed from
scratch at every doubling (8 + 16 + 32 + 64 evaluations for a 64-step answer), and it cannot stop
one image while continuing another, so an image got more steps in a batch with a hard one than
alone. It also sizes its chunks only by ``internal_batch_size``. Here:

- a fixed ``steps`` uses captum's quadrature (Gauss-Legendre by default: the same points and
  weights, so the same maps);
- ``"auto"`` uses the nested Clenshaw-Curtis rule (:func:`clenshaw_curtis`): doubling the
  steps adds only new points, so reaching ``n`` steps costs ``n + 1`` evaluations however many
  doublings it took (the trapezoid rule nests too, but missed 1 % at 256 steps where this
  rule and Gauss-Legendre reach it by 64), and each image
  stops at the fewest steps (16, 32, ... 256) whose completeness error
  ``|sum(attr) - (F(x) - F(baseline))| / |F(x) - F(baseline)|`` is at most ``tolerance`` and
  whose map moved by at most ``map_tolerance`` at the last doubling, so its map does not
  depend on the other images in the batch;
- the rows of (image, path point) go through the model in chunks sized to the device
  (:class:`ChunkSizer`): on CUDA by the free memory, with a fallback to smaller chunks when one
  runs out of memory; on the CPU as many as take the memory of 16 images at 224 px.

Gradients are taken with ``torch.autograd.grad`` with respect to the inputs only: nothing
reaches the parameters' ``.grad``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS, approximation_parameters
from torch import Tensor

from lightning_saliency import console
from lightning_saliency.engine.batching import internal_batch_size
from lightning_saliency.engine.methods.base import (
    MethodOptions,
    MethodScore,
    SaliencyMethod,
    register,
)
from lightning_saliency.engine.methods.session import ExplainSession
from lightning_saliency.errors import SaliencyConfigError

AUTO_STEPS = (8, 16, 32, 64, 128, 256)
SAFETY = 0.5  # share of the free GPU memory a chunk may take


@dataclass(frozen=True)
class IntegratedGradientsOptions(MethodOptions):
    """Options of ``integrated_gradients``.

    Attributes:
        steps: integration steps, or ``"auto"``: per image, the fewest of 16, 32, ... 256
            whose completeness error is at most ``tolerance`` and whose map moved by at most
            ``map_tolerance`` at the last doubling (nested Clenshaw-Curtis rule: each doubling
            reuses the evaluations made).
        baseline: ``None`` (zeros: the mean image for normalised inputs), a number, or a tensor.
        internal_batch_size: (image, step) rows per pass; ``None``: sized to the device (the
            free memory on CUDA, the memory of 16 images at 224 px on the CPU).
        method: captum's quadrature for a fixed ``steps`` (``gausslegendre``,
            ``riemann_trapezoid``, ...).
        tolerance: the completeness error ``"auto"`` aims for.
        map_tolerance: how much (relative L1) the map may still move at the last doubling of
            ``"auto"`` (its error estimate; the distance to a 256-step map is about half).
    """

    steps: int | Literal["auto"] = "auto"
    baseline: float | Tensor | None = None
    internal_batch_size: int | None = None
    method: str = "gausslegendre"
    tolerance: float = 0.01
    map_tolerance: float = 0.05

    def check(self) -> None:
        if self.steps != "auto" and int(self.steps) < 1:
            raise ValueError(f"steps must be a positive int or 'auto', got {self.steps!r}")
        if self.steps != "auto" and self.method != "gausslegendre" and int(self.steps) < 2:
            raise ValueError(f"{self.method} needs steps >= 2, got {self.steps!r}")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1, got {self.internal_batch_size}")
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"method must be one of {SUPPORTED_METHODS}, got {self.method!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if not self.map_tolerance > 0:
            raise ValueError(f"map_tolerance must be > 0, got {self.map_tolerance}")


def make_baseline(images: Tensor, baseline: float | Tensor | None) -> Tensor:
    """``None`` → zeros (the mean image for normalised inputs); a number → constant; a tensor
    broadcast to the images."""
    if baseline is None:
        return torch.zeros_like(images)
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, Tensor):
        return baseline.to(images.device, images.dtype).expand_as(images).clone()
    raise SaliencyConfigError(f"baseline must be None, a number or a tensor, got {baseline!r}.")


def completeness_error(attributions: Tensor, scores: Tensor, baseline_scores: Tensor) -> Tensor:
    """Per-image relative completeness error of IG attributions ``(N, C, H, W)`` for the
    explained scores ``(N,)`` at the images and at the baselines."""
    gap = scores - baseline_scores
    total = attributions.flatten(1).sum(dim=1)
    return (total - gap).abs() / gap.abs().clamp(min=1e-6)


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class ChunkSizer:
    """How many (image, step) rows go through the model at once.

    The first chunk has the CPU's size. On CUDA the memory it took (allocated after its
    forward, twice that for the backward) gives the bytes per row, and the next chunks take
    :data:`SAFETY` of the free memory (``torch.cuda.mem_get_info``). A chunk that runs out of
    memory is retried at half the size (said once); a single row that does is an error.
    ``free_memory`` and ``allocated`` stand in for the CUDA functions in tests.

    Examples:
        >>> sizer = ChunkSizer(16, cuda=True, free_memory=lambda: 8 * 2**30, allocated=lambda: 0)
        >>> sizer.rows
        16
        >>> sizer.learn(16, 2**30)  # 16 rows held 1 GiB after their forward
        >>> sizer.rows  # half of 8 GiB free, at 2 x 64 MiB a row
        32
    """

    def __init__(
        self,
        rows: int,
        cuda: bool,
        fixed: bool = False,
        free_memory: Callable[[], int] | None = None,
        allocated: Callable[[], int] | None = None,
    ) -> None:
        self.rows = max(1, rows)
        self.cuda = cuda and not fixed
        self.free_memory = free_memory or (lambda: torch.cuda.mem_get_info()[0])
        self.allocated = allocated or torch.cuda.memory_allocated
        self.shrunk = False
        self._learnt = False

    def learn(self, rows: int, forward_bytes: int) -> None:
        """After the first chunk's forward: its memory sizes the chunks that follow."""
        if not self.cuda or self._learnt or rows < 1 or forward_bytes <= 0:
            return
        self._learnt = True
        per_row = 2 * forward_bytes / rows
        self.rows = max(1, int(SAFETY * self.free_memory() // per_row))

    def shrink(self, err: BaseException) -> None:
        """A chunk ran out of memory: half the rows, or the error itself at one row."""
        if self.rows <= 1:
            raise err
        self.rows = max(1, self.rows // 2)
        if not self.shrunk:
            self.shrunk = True
            console.warn(
                "integrated_gradients: a chunk ran out of device memory; continuing with "
                f"{self.rows} rows per pass (set ig_internal_batch_size to choose)."
            )
        if self.cuda:
            torch.cuda.empty_cache()


def chunk_sizer(options: Any, images: Tensor) -> ChunkSizer:
    """The :class:`ChunkSizer` of a method whose options have ``internal_batch_size``: that
    many rows, fixed, when given; else the CPU's size to start, sized to the device on CUDA."""
    rows = internal_batch_size(options.internal_batch_size, images)
    cuda = images.device.type == "cuda"
    return ChunkSizer(rows, cuda, fixed=options.internal_batch_size is not None)


class PathGradients:
    """Gradients of the explained score along straight paths from baselines to images.

    ``evaluate(index, alphas)`` returns, for each row ``r``, the input gradient at
    ``baseline[i] + alphas[r] * (image[i] - baseline[i])`` with ``i = index[r]``, and the
    score there; ``evaluate_points`` does so at any points a function makes. Rows go through
    the model in chunks of :class:`ChunkSizer`. ``evaluations`` counts the rows evaluated.
    ``origin`` says which of the session's images each of ``images`` is a copy of (its target
    and extra arguments; noisy copies of the images for the noise methods).
    """

    def __init__(
        self,
        session: ExplainSession,
        images: Tensor,
        baselines: Tensor,
        sizer: ChunkSizer,
        origin: Tensor | None = None,
    ) -> None:
        self.forward, self.target, self.extra = session.captum_forward()
        self.images, self.baselines, self.sizer = images.detach(), baselines.detach(), sizer
        self.origin = origin
        self.evaluations = 0

    def _scores(self, x: Tensor, index: Tensor) -> Tensor:
        if self.origin is not None:
            index = self.origin[index]
        extra = [e[index] for e in self.extra]
        out = self.forward(x, *extra)
        if isinstance(self.target, Tensor):
            return out.gather(1, self.target[index][:, None]).squeeze(1)
        return out[:, self.target]

    def _chunk(self, index: Tensor, points: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        before = self.sizer.allocated() if self.sizer.cuda else 0
        with torch.enable_grad():
            x = points().detach().requires_grad_(True)
            scores = self._scores(x, index)
            if self.sizer.cuda:
                self.sizer.learn(len(index), self.sizer.allocated() - before)
            (grads,) = torch.autograd.grad(scores.sum(), x)
        return grads.detach(), scores.detach()

    def evaluate(
        self, index: Tensor, alphas: Tensor, keep: Callable[[slice, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Gradients at each row's path point, handed chunk by chunk to ``keep(rows, grads)``
        (which reduces them, so a chunk's gradients are never all held); returns what ``keep``
        returned, concatenated, and the scores ``(R,)``."""
        shape = (-1,) + (1,) * (self.images.dim() - 1)

        def points(rows: slice) -> Tensor:
            base = self.baselines[index[rows]]
            alpha = alphas[rows].to(base.dtype).reshape(shape)
            return base + alpha * (self.images[index[rows]] - base)

        return self.evaluate_points(index, points, keep)

    def evaluate_points(
        self,
        index: Tensor,
        points: Callable[[slice], Tensor],
        keep: Callable[[slice, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Gradients at ``points(rows)`` (the inputs of those rows; row ``r`` explains image
        ``index[r]``), handed chunk by chunk to ``keep(rows, grads)``, as :meth:`evaluate`."""
        kept, scores, start = [], [], 0
        while start < len(index):
            stop = min(len(index), start + self.sizer.rows)
            rows = slice(start, stop)
            try:
                grads, s = self._chunk(index[rows], functools.partial(points, rows))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not _is_out_of_memory(err):
                    raise
                self.sizer.shrink(err)
                continue
            kept.append(keep(rows, grads))
            scores.append(s)
            self.evaluations += stop - start
            start = stop
        return torch.cat(kept), torch.cat(scores)


def fixed_steps(path: PathGradients, steps: int, method: str) -> Tensor:
    """IG with captum's quadrature ``method`` at ``steps`` points: ``(N, C, H, W)``."""
    weights_of, alphas_of = approximation_parameters(method)
    images = path.images
    n, device = images.shape[0], images.device
    alphas = torch.tensor(alphas_of(steps), device=device, dtype=torch.float64).repeat(n)
    weights = torch.tensor(weights_of(steps), device=device, dtype=torch.float32).repeat(n)
    index = torch.arange(n, device=device).repeat_interleave(steps)
    integral = torch.zeros(images.shape, device=device, dtype=torch.float32)
    shape = (-1,) + (1,) * (images.dim() - 1)

    def accumulate(rows: slice, grads: Tensor) -> Tensor:
        integral.index_add_(0, index[rows], grads.float() * weights[rows].reshape(shape))
        return grads.new_zeros(0)

    path.evaluate(index, alphas.float(), accumulate)
    return (images - path.baselines).float() * integral


@functools.lru_cache(maxsize=16)
def clenshaw_curtis(steps: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the Clenshaw-Curtis rule on ``[0, 1]`` with ``steps + 1`` points
    (``steps`` even): ``(1 - cos(k pi / steps)) / 2``, so the points of ``steps`` are every
    other point of ``2 * steps`` (nested) and include both ends. As accurate as Gauss-Legendre
    on IG's integrands (it clusters points near the ends too), unlike the trapezoid rule.

    Examples:
        >>> nodes, weights = clenshaw_curtis(2)  # Simpson's rule
        >>> nodes.tolist(), [round(w, 4) for w in weights.tolist()]
        ([0.0, 0.5, 1.0], [0.1667, 0.6667, 0.1667])
    """
    k = torch.arange(steps + 1, dtype=torch.float64)
    theta = k * math.pi / steps
    weights = torch.ones(steps + 1, dtype=torch.float64)
    for j in range(1, steps // 2 + 1):
        b = 1.0 if 2 * j == steps else 2.0
        weights -= b / (4 * j * j - 1) * torch.cos(2 * j * theta)
    ends = torch.full((steps + 1,), 2.0, dtype=torch.float64)
    ends[0] = ends[-1] = 1.0
    weights = ends * weights / steps / 2  # sums to 1 on [0, 1]
    nodes = (1 - torch.cos(theta)) / 2
    nodes[steps // 2] = 0.5  # exact, so the points of steps and 2 * steps coincide
    return nodes, weights


def auto_steps(
    path: PathGradients, tolerance: float, map_tolerance: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, the nested Clenshaw-Curtis rule doubled from 8 steps until the completeness
    error is at most ``tolerance`` and the map moved by at most ``map_tolerance`` (relative
    L1) since the previous step count, or 256 steps: maps ``(N, H, W)`` (summed over
    channels), the steps ``(N,)`` and the completeness errors ``(N,)``. The map's change is the
    embedded error estimate: on ReLU networks the map converges as ``1 / steps``, so its
    distance to a 256-step map is about half its last change. Each doubling evaluates only the
    new points, and only for the images not yet within both; each point's contribution is kept
    as an ``(H, W)`` map (the rule's weights change with the step count)."""
    images = path.images
    n, device = images.shape[0], images.device
    delta = (images - path.baselines).float()

    def contributions(index: Tensor, alphas: Tensor, count: int) -> tuple[Tensor, Tensor]:
        def per_point(rows: slice, grads: Tensor) -> Tensor:  # (rows, H, W)
            return (grads.float() * delta[index[rows]]).sum(dim=1)

        kept, scores = path.evaluate(index, alphas.float(), per_point)
        shape = (len(index) // count, count, *kept.shape[1:])
        return kept.reshape(shape), scores.float().reshape(shape[:2])

    level = AUTO_STEPS[0]
    nodes, _ = clenshaw_curtis(level)
    everyone = torch.arange(n, device=device)
    points, scores = contributions(
        everyone.repeat_interleave(level + 1), nodes.to(device).repeat(n), level + 1
    )
    at_image, at_baseline = scores[:, -1], scores[:, 0]
    steps = torch.full((n,), level, device=device, dtype=torch.long)
    maps = torch.zeros(n, *images.shape[2:], device=device)
    error = torch.zeros(n, device=device)
    active = everyone
    change = torch.full((n,), math.inf, device=device)
    while True:
        weights = clenshaw_curtis(level)[1].to(device).float()
        now = (points * weights[None, :, None, None]).sum(dim=1)
        moved = (now - maps[active]).flatten(1).abs().sum(dim=1)
        if level > AUTO_STEPS[0]:
            change[active] = moved / now.flatten(1).abs().sum(dim=1).clamp(min=1e-12)
        maps[active] = now
        total = now.flatten(1).sum(dim=1)
        gap = at_image[active] - at_baseline[active]
        error[active] = (total - gap).abs() / gap.abs().clamp(min=1e-6)
        steps[active] = level
        keep = (error[active] > tolerance) | (change[active] > map_tolerance)
        if level == AUTO_STEPS[-1] or not bool(keep.any()):
            break
        active, points = active[keep], points[keep]
        level *= 2
        new_nodes = clenshaw_curtis(level)[0][1::2].to(device)
        fresh, _ = contributions(
            active.repeat_interleave(len(new_nodes)), new_nodes.repeat(len(active)), len(new_nodes)
        )
        merged = torch.empty(len(active), level + 1, *points.shape[2:], device=device)
        merged[:, 0::2], merged[:, 1::2] = points, fresh
        points = merged
    return maps, steps, error


def integrated_gradients(session: ExplainSession, options: IntegratedGradientsOptions) -> Tensor:
    """Signed IG attribution summed over channels ``(N, H, W)``: its pixel sum is the total."""
    images = session.images
    baselines = make_baseline(images, options.baseline)
    path = PathGradients(session, images, baselines, chunk_sizer(options, images))
    if options.steps == "auto":
        maps, steps, error = auto_steps(path, options.tolerance, options.map_tolerance)
        session.extras["ig_steps"] = steps
    else:
        attr = fixed_steps(path, int(options.steps), options.method)
        with torch.no_grad():
            scores = session.target_scores(images).float()
            base_scores = session.target_scores(baselines).float()
        error = completeness_error(attr, scores, base_scores)
        session.extras["ig_steps"] = int(options.steps)
        maps = attr.sum(dim=1)
    session.extras["ig_completeness_error"] = error
    session.extras["ig_evaluations"] = path.evaluations
    return maps


register(
    SaliencyMethod(
        "integrated_gradients",
        integrated_gradients,
        "Integrated Gradients: signed pixel attributions that sum to F(x) - F(baseline).",
        options=IntegratedGradientsOptions,
        sign="signed",
        cost="expensive",
        passes="steps x (1F + 1B)",
        needs_layer=False,
        flat_names={
            "ig_steps": "steps",
            "ig_baseline": "baseline",
            "ig_internal_batch_size": "internal_batch_size",
            "ig_method": "method",
            "ig_tolerance": "tolerance",
            "ig_map_tolerance": "map_tolerance",
        },
        scores=(
            MethodScore(
                "ig_completeness_error",
                "ig_completeness_error",
                threshold=0.05,
                meaning="Integrated Gradients does not add up to the score change: raise "
                "ig_steps (or use ig_steps='auto')",
            ),
            MethodScore("ig_steps", "steps"),
        ),
        extras={
            "ig_steps": "the step count used (with 'auto': (N,), one per image)",
            "ig_completeness_error": "(N,) |sum(IG) - (F(x) - F(baseline))| / |F(x) - F(b)|",
            "ig_evaluations": "how many (image, step) gradients were evaluated",
        },
        aliases=("ig", "integrated-gradients"),
    )
)
