"""Does a method's map depend on the model? The cascading model-parameter randomisation test.

Adebayo et al. 2018 ("Sanity Checks for Saliency Maps"): randomise the model's layers from the
head down, one more at each step, and compare each method's maps with those of the trained
model. A map that stays the same once the top of the network is random shows the input, not
the model's evidence (guided backpropagation is the known case).

The order and the randomisation are Quantus's ``MPRT(layer_order="top_down")``: the modules
that have ``reset_parameters`` in reverse ``named_modules()`` order, each reset after
``torch.manual_seed(seed + 1)``; ``tests/test_sanity.py`` checks that the similarities equal
``quantus.MPRT``'s. Here it runs on a copy of the model inside a forked RNG (the global RNG and
the model are untouched), on the images' device, and the maps are compared at a few depths of
the cascade (``depths``; every layer with ``depths=None``).

Why our own: Quantus runs on numpy copies on the CPU, one explanation call per layer, and
cannot be handed the callback's own explanation settings (target layer, layouts, targets).

A map that is constant everywhere (a dead Grad-CAM on a random layer) has no ordering left: it
counts as similarity 0 (Quantus reports NaN).

Similarities (torchmetrics): Spearman rank correlation of the absolute maps (Quantus's default
``abs=True``) and of the signed maps, and SSIM of the absolute maps scaled to [0, 1]. A method
**passes** when the absolute-map Spearman, averaged over the samples and the reported depths,
is below ``threshold`` (0.5): its maps have lost most of their ordering once the model they
explain is gone. Concept methods (DFF) are not tested: their concepts are factorised anew on
each model, so there is no map to hold against the original.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_saliency.engine.explanations import Explanations, explain, normalize_methods
from lightning_saliency.engine.methods import DEFAULT_METHODS, METHODS
from lightning_saliency.engine.sharded import is_sharded, reshard
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.evaluate.scores import rank_correlation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THRESHOLD = 0.5
"""A method passes when its mean Spearman over the cascade is below this."""


def randomisation_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the cascade randomises, head first: those with ``reset_parameters``, in
    reverse ``named_modules()`` order (Quantus's ``top_down``).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> [name for name, _ in randomisation_order(net)]
        ['3', '0']
    """
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]


def cascade_depths(layers: int, depths: int | Sequence[int] | None) -> list[int]:
    """How many layers are randomised at each comparison: ``None`` every depth; an int ``k``
    that many, evenly spread from the head alone (1) to the whole model; or the given list.

    Examples:
        >>> cascade_depths(10, 4), cascade_depths(3, None), cascade_depths(10, [2, 5])
        ([1, 4, 7, 10], [1, 2, 3], [2, 5])
    """
    if layers < 1:
        return []
    if depths is None:
        return list(range(1, layers + 1))
    if isinstance(depths, int):
        k = max(1, min(depths, layers))
        if k == 1:
            return [layers]
        return sorted({round(1 + i * (layers - 1) / (k - 1)) for i in range(k)})
    chosen = sorted({int(d) for d in depths})
    if not chosen or chosen[0] < 1 or chosen[-1] > layers:
        raise ValueError(f"depths must lie in 1..{layers}, got {list(depths)}")
    return chosen


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Spearman of ``(N, H, W)`` maps; 0 where either map is constant."""
    return rank_correlation(a.flatten(1), b.flatten(1))


def _ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample SSIM of the absolute maps, each scaled to [0, 1] by its maximum."""

    def scaled(m: Tensor) -> Tensor:
        m = m.abs().float()
        return (m / m.flatten(1).amax(1).clamp(min=1e-12)[:, None, None])[:, None]

    side = min(a.shape[-2:])
    kernel = max(3, min(11, side if side % 2 else side - 1))
    value = structural_similarity_index_measure(
        scaled(a), scaled(b), data_range=1.0, kernel_size=kernel, reduction="none"
    )
    return torch.as_tensor(value).float().reshape(-1)


@dataclass
class SanityReport:
    """The cascading randomisation test's result.

    Attributes:
        methods: the methods tested (map methods only).
        layers: ``(depth, module name)`` of each comparison: ``depth`` layers randomised, the
            last of them ``module name``.
        spearman_abs: method -> ``(depths, N)`` Spearman of the absolute maps.
        spearman_signed: method -> ``(depths, N)`` Spearman of the signed maps.
        ssim: method -> ``(depths, N)`` SSIM of the absolute maps.
        threshold: the pass mark on the mean absolute Spearman.
        maps: method -> ``(1 + depths, H, W)`` maps of the first sample: the trained model's,
            then each depth's (for the figure).
        errors: method -> the exception, for a method that failed.
    """

    methods: list[str]
    layers: list[tuple[int, str]]
    spearman_abs: dict[str, Tensor]
    spearman_signed: dict[str, Tensor]
    ssim: dict[str, Tensor]
    threshold: float = THRESHOLD
    maps: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def read(self, method: str) -> Tensor:
        """``(depths, N)``: the Spearman that matches how the map is read: of the signed maps
        for a signed method (their sign is part of what they say, and the scores read their
        positive part), of the absolute maps for a non-negative one."""
        signed = METHODS[method].sign == "signed"
        return (self.spearman_signed if signed else self.spearman_abs)[method]

    def similarity(self, method: str) -> float:
        """What pass/fail reads: :meth:`read`, averaged over samples and depths."""
        return float(self.read(method).mean())

    @property
    def passed(self) -> dict[str, bool]:
        """Method -> whether its maps depend on the model (similarity below the threshold)."""
        return {m: self.similarity(m) < self.threshold for m in self.methods}

    @property
    def failed(self) -> list[str]:
        return [m for m, ok in self.passed.items() if not ok]

    def table(self) -> str:
        """A Markdown table: per method, the Spearman the verdict reads at each depth, its
        mean, the absolute-map Spearman and SSIM over the cascade, and the verdict."""
        head = ["method", "read"] + [f"top {d} ({name})" for d, name in self.layers]
        head += ["mean", "abs. Spearman", "SSIM", "verdict"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            cells = [f"`{m}`", "signed" if METHODS[m].sign == "signed" else "map"]
            cells += [f"{v:.2f}" for v in self.read(m).mean(1).tolist()]
            cells += [
                f"{self.similarity(m):.2f}",
                f"{float(self.spearman_abs[m].mean()):.2f}",
                f"{float(self.ssim[m].mean()):.2f}",
                "passes" if self.passed[m] else "**fails: not model-sensitive**",
            ]
            rows.append("| " + " | ".join(cells) + " |")
        for m, err in self.errors.items():
            rows.append(f"| `{m}` | failed: {type(err).__name__}: {err} |")
        return "\n".join(rows)

    def picture(self) -> Tensor:
        """:meth:`figure` as a ``uint8 (3, H, W)`` image, for the loggers (no pyplot: safe
        on the writer's thread)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(self.figure())
        canvas.draw()  # type: ignore[no-untyped-call]
        rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)  # type: ignore[no-untyped-call]
        width, height = canvas.get_width_height()
        return rgba.reshape(height, width, 4)[..., :3].permute(2, 0, 1).contiguous()

    def figure(self) -> Figure:
        """Left: each method's Spearman (the one its verdict reads) down the cascade, with
        the pass mark.
        Right: the first sample's maps, trained model first, then each depth. Made without
        pyplot (nothing global to close)."""
        import matplotlib
        from matplotlib.figure import Figure

        rows, depths = max(1, len(self.methods)), len(self.layers)
        fig = Figure(figsize=(4.5 + 1.1 * (depths + 1), 0.4 + 1.1 * rows), dpi=100)
        grid = fig.add_gridspec(rows, depths + 3, width_ratios=[4, 0.6] + [1] * (depths + 1))
        curve = fig.add_subplot(grid[:, 0])
        x = list(range(1, depths + 1))
        tab20 = matplotlib.colormaps["tab20"]
        palette = [tab20(k) for k in range(20)]  # then the markers differ
        for i, m in enumerate(self.methods):
            colour = palette[(2 * i) % 20 + (i // 10) % 2]
            marker = "osD^v"[i // 4 % 5]
            curve.plot(x, self.read(m).mean(1).tolist(), label=m, color=colour, marker=marker)
        curve.axhline(self.threshold, color="grey", linestyle="--", linewidth=1)
        curve.set_xticks(x, [name for _, name in self.layers], rotation=60, fontsize=7)
        lowest = min([float(t.mean(1).min()) for t in self.spearman_signed.values()] + [-0.2])
        curve.set_ylim(lowest - 0.1, 1.05)
        curve.set_ylabel("Spearman with the trained model's map")
        curve.set_title("randomised from the head down", fontsize=9)
        curve.legend(fontsize=7)
        for r, m in enumerate(self.methods):
            stack = self.maps.get(m)
            for c in range(depths + 1):
                ax = fig.add_subplot(grid[r, c + 2])
                ax.set_xticks([])
                ax.set_yticks([])
                if stack is not None and c < len(stack):
                    tile = stack[c].abs().cpu()
                    shown = (tile / tile.max().clamp(min=1e-12)).numpy()
                    ax.imshow(shown, cmap="inferno", vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(m.replace("_", "_\n"), fontsize=7)  # fits the tile's height
                if r == 0:
                    ax.set_title(
                        "trained |map|" if c == 0 else f"top {self.layers[c - 1][0]}", fontsize=7
                    )
        fig.tight_layout()
        return fig


def sanity_check(
    model: nn.Module,
    images: Tensor,
    targets: Any = None,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    target_layer: str | nn.Module | None = None,
    *,
    depths: int | Sequence[int] | None = 4,
    threshold: float = THRESHOLD,
    seed: int = 42,
    noise_seed: int = 0,
    original: Explanations | None = None,
    **explain_options: Any,
) -> SanityReport:
    """The cascading model-parameter randomisation test of ``methods`` on ``images``.

    Args:
        model: the trained classifier (left untouched: the test randomises a copy).
        images: as :func:`lightning_saliency.explain`.
        targets: as :func:`lightning_saliency.explain`; they stay those of the trained model
            all the way down the cascade.
        methods: as :func:`lightning_saliency.explain`.
        target_layer: as :func:`lightning_saliency.explain`.
        depths: where to compare (:func:`cascade_depths`): ``4`` comparisons from the head
            alone to the whole model; ``None`` after every layer (as Quantus).
        threshold: the pass mark on the mean absolute-map Spearman.
        seed: the randomisation seed (Quantus's ``seed``; each layer is reset after
            ``torch.manual_seed(seed + 1)`` inside a forked RNG).
        noise_seed: ``explain()``'s ``seed`` (the noise of noisy methods).
        original: the trained model's explanations of ``images`` when already computed (the
            callback's of this epoch), to save one explanation.
        **explain_options: passed to ``explain()`` (``method_options``, ``layout``, ...).

    Returns:
        :class:`SanityReport`. It costs ``1 + len(depths)`` explanations of ``images`` (one
        fewer with ``original``) and one copy of the model.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> report = sanity_check(net, torch.rand(2, 3, 16, 16), methods=("gradcam",))
        >>> [d for d, _ in report.layers], sorted(report.passed)
        ([1, 2], ['gradcam'])
    """
    names = [m for m in normalize_methods(methods) if METHODS[m].kind == "map"]
    with randomisable(model) as twin:
        return _cascade(
            twin, images, targets, names, target_layer, depths, threshold, seed, noise_seed,
            original, explain_options,
        )  # fmt: skip


@contextlib.contextmanager
def randomisable(model: nn.Module) -> Iterator[nn.Module]:
    """A model the cascade may randomise: a copy; or, for a model sharded by FSDP2 (which
    refuses copies), the model itself, every parameter and buffer put back bit for bit
    afterwards, also after an error. Every rank randomises and restores together.

    Examples:
        >>> net = nn.Linear(2, 2); before = net.weight.clone()
        >>> with randomisable(net) as twin:
        ...     twin is net
        False
    """
    if not any(is_sharded(p) for p in model.parameters()):
        yield copy.deepcopy(model)
        return
    saved = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    try:
        yield model
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        reshard(model)  # no unsharded copy of the randomised weights outlives the test


def _cascade(
    twin: nn.Module,
    images: Tensor,
    targets: Any,
    names: list[str],
    target_layer: str | nn.Module | None,
    depths: int | Sequence[int] | None,
    threshold: float,
    seed: int,
    noise_seed: int,
    original: Explanations | None,
    explain_options: dict[str, Any],
) -> SanityReport:
    """The cascade on ``twin`` (which it randomises)."""
    explain_options["seed"] = noise_seed
    if original is None or any(m not in original.maps for m in names):
        original = explain(
            twin, images, targets, names, target_layer, on_error="collect", **explain_options
        )
    fixed_targets = targets if callable(targets) or _multi_hot(targets) else original.targets
    layer = original.layer_name if original.layer_name is not None else target_layer
    order = randomisation_order(twin)
    if not order:
        raise SaliencyConfigError(
            f"{type(twin).__name__} has no module with reset_parameters(): the randomisation "
            "test has nothing to randomise."
        )
    chosen = cascade_depths(len(order), depths)
    tested = [m for m in names if m in original.maps]
    abs_rho: dict[str, list[Tensor]] = {m: [] for m in tested}
    signed_rho: dict[str, list[Tensor]] = {m: [] for m in tested}
    ssim: dict[str, list[Tensor]] = {m: [] for m in tested}
    maps = {m: [original[m][0]] for m in tested}
    errors = dict(original.errors)
    devices = [images.device] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        for depth, (_, module) in enumerate(order, start=1):
            torch.default_generator.manual_seed(seed + 1)
            if images.is_cuda:  # the images' device only; fork_rng restores it
                with torch.cuda.device(images.device):
                    torch.cuda.manual_seed(seed + 1)
            module.reset_parameters()  # type: ignore[operator]
            if depth not in chosen:
                continue
            out = explain(
                twin, images, fixed_targets, tested, layer, on_error="collect", **explain_options
            )
            for m in list(tested):
                if m in out.errors:
                    errors[m] = out.errors[m]
                    continue
                a, b = original[m], out[m]
                abs_rho[m].append(_spearman(a.abs(), b.abs()))
                signed_rho[m].append(_spearman(a, b))
                ssim[m].append(_ssim(a, b))
                maps[m].append(b[0])
    ok = [m for m in tested if m not in errors]
    return SanityReport(
        methods=ok,
        layers=[(d, order[d - 1][0] or type(order[d - 1][1]).__name__) for d in chosen],
        spearman_abs={m: torch.stack(abs_rho[m]) for m in ok},
        spearman_signed={m: torch.stack(signed_rho[m]) for m in ok},
        ssim={m: torch.stack(ssim[m]) for m in ok},
        threshold=threshold,
        maps={m: torch.stack(maps[m]).detach().cpu() for m in ok},
        errors=errors,
    )


def _multi_hot(targets: Any) -> bool:
    return isinstance(targets, Tensor) and targets.dim() == 2


__all__ = ["THRESHOLD", "SanityReport", "cascade_depths", "randomisation_order", "sanity_check"]
