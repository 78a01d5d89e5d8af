"""DDP ranks share the fixed samples: rank r explains ``samples[r::W]``, the pieces are gathered.

Every rank enters the same collectives in the same order, whatever failed where: a method that
failed on one rank sends zeros and a raised flag, and every rank then drops it together (the
failure policy switches it off everywhere). After the gather every rank holds the same
:class:`~lightning_saliency.engine.explanations.Explanations` as a single-device run (sample order
included), so every rank computes the same scores and EarlyStopping agrees across ranks. Only
the strategy's own ``all_gather`` is used; no communication of our own.

Per-sample extras (``ig_completeness_error``, ``ig_steps`` with ``"auto"``) are gathered with
the maps; other extras are taken from the local run. Methods that factorise all samples jointly
(DFF, whose registry record has a ``joint`` function) share the forward: each rank computes its
share's layer activations, they are gathered (:func:`gather_activations`), and every rank
factorises all of them alike, so the concepts are those of a single-device run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS


class Gathers(Protocol):
    """What sharing needs of a Lightning strategy."""

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        """``(W, *shape)``: every rank's tensor."""
        ...


def share_of(n: int, rank: int, world: int) -> list[int]:
    """The sample indices rank ``rank`` of ``world`` explains.

    Examples:
        >>> share_of(5, 0, 2), share_of(5, 1, 2)
        ([0, 2, 4], [1, 3])
    """
    return list(range(rank, n, world))


def shareable(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """The methods whose samples can be split across ranks, and the others (concepts).

    Examples:
        >>> shareable(["gradcam", "dff", "integrated_gradients"])
        (['gradcam', 'integrated_gradients'], ['dff'])
    """
    split = [m for m in methods if METHODS[m].kind == "map"]
    return split, [m for m in methods if m not in split]


def _interleave(gathered: Tensor, n: int) -> Tensor:
    """``(W, rows, ...)`` padded shares -> ``(n, ...)`` in sample order (sample i is row
    ``i // W`` of rank ``i % W``)."""
    world = gathered.shape[0]
    order = torch.arange(n)
    return gathered[order % world, order // world]


def _all_gather(strategy: Gathers, value: Tensor) -> Tensor:
    """``strategy.all_gather``, without the deprecation warning Lightning's implementation
    triggers in torch at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        return strategy.all_gather(value)


def _gather_shares(
    strategy: Gathers, value: Tensor, n: int, rank: int, world: int, device: torch.device
) -> Tensor:
    """This rank's ``(share, ...)`` rows, padded to the largest share, gathered from every
    rank and put back in sample order: ``(n, ...)``."""
    padded = torch.zeros((-(-n // world), *value.shape[1:]), dtype=value.dtype, device=device)
    padded[: len(share_of(n, rank, world))] = value.to(device)
    return _interleave(_all_gather(strategy, padded), n)


def gather_explanations(
    strategy: Gathers,
    local: Explanations | None,
    errors: dict[str, BaseException],
    methods: Sequence[str],
    n: int,
    rank: int,
    world: int,
    size: tuple[int, int],
    device: torch.device,
) -> tuple[Explanations | None, dict[str, BaseException]]:
    """Gather every rank's share of ``methods`` into the explanations of all ``n`` samples.

    Args:
        strategy: the trainer's strategy (its ``all_gather``).
        local: this rank's explanations of its share (``None`` if the whole pass failed).
        errors: this rank's failures, method -> exception.
        methods: the shared methods, in the same order on every rank.
        n: the number of samples; rank, world: this rank and the world size.
        size: the maps' ``(H, W)``; device: where the samples live.

    Returns:
        The gathered explanations (``None`` if every method failed on some rank) and the
        failures: a method that failed on any rank fails everywhere, with the local exception
        or one that names the other rank.
    """
    mine = len(share_of(n, rank, world))

    def gather(value: Tensor) -> Tensor:
        return _gather_shares(strategy, value, n, rank, world, device)

    # what this rank has: a flag per method, the class count and the layer grid
    ok = [local is not None and m in local.maps and m not in errors for m in methods]
    classes = local.logits.shape[1] if local is not None else 0
    cells = local.layer_cells if local is not None and local.layer_cells else (-1, -1)
    header = torch.tensor([*[float(f) for f in ok], float(classes), *map(float, cells)])
    everyone = _all_gather(strategy, header.to(device)).reshape(world, -1).cpu()
    failed_anywhere = {m for i, m in enumerate(methods) if not bool(everyone[:, i].all())}
    classes = int(everyone[:, len(methods)].max())
    grid = everyone[:, len(methods) + 1 :].amax(dim=0).long().tolist()
    merged_errors = dict(errors)
    for method in failed_anywhere:
        merged_errors.setdefault(method, RuntimeError(f"{method} failed on another rank"))
    if classes == 0:  # no rank could run the model: nothing to gather
        return None, merged_errors

    h, w = size
    logits = local.logits if local is not None else torch.zeros(mine, classes, device=device)
    targets = local.targets if local is not None else torch.zeros(mine, device=device)
    all_logits = gather(logits.float())
    all_targets = gather(targets.float()).long()
    maps: dict[str, Tensor] = {}
    extras: dict[str, Any] = dict(local.extras) if local is not None else {}
    for i, method in enumerate(methods):
        piece = local.maps[method].float() if ok[i] and local is not None else None
        all_maps = gather(piece if piece is not None else torch.zeros(mine, h, w, device=device))
        for key in sorted(METHODS[method].extras):
            value = extras.get(key) if ok[i] else None
            per_sample = isinstance(value, Tensor) and value.dim() == 1 and len(value) == mine
            flag = torch.tensor([float(per_sample)], device=device)
            any_per_sample = bool(_all_gather(strategy, flag).max() > 0)
            if any_per_sample:
                sent = value.float() if per_sample and isinstance(value, Tensor) else None
                if sent is None:
                    sent = torch.full((mine,), float("nan"), device=device)
                extras[key] = gather(sent)
        if method not in failed_anywhere:
            maps[method] = all_maps
    return (
        Explanations(
            maps=maps,
            logits=all_logits,
            targets=all_targets,
            layer_name=local.layer_name if local is not None else None,
            layer_cells=None if grid[0] < 0 else (int(grid[0]), int(grid[1])),
            extras=extras,
            errors={m: merged_errors[m] for m in methods if m in merged_errors},
        ),
        merged_errors,
    )


def gather_activations(
    strategy: Gathers,
    local: Tensor | None,
    n: int,
    rank: int,
    world: int,
    device: torch.device,
) -> Tensor | None:
    """Every rank's share of the target layer's ``(rows, C, h, w)`` activations, gathered into
    ``(n, C, h, w)`` in sample order; ``None`` on every rank when any rank has none (its
    forward failed), so that all ranks skip the joint methods together.

    A header (this rank's flag and shape) goes first, so every rank knows the shape to gather
    before it gathers; every rank enters the same two collectives whatever happened.
    """
    mine = len(share_of(n, rank, world))
    shape = list(local.shape[1:]) if local is not None and local.dim() == 4 else [0, 0, 0]
    header = torch.tensor([float(local is not None and local.dim() == 4), *map(float, shape)])
    everyone = _all_gather(strategy, header.to(device)).reshape(world, -1).cpu()
    if not bool(everyone[:, 0].all()):
        return None
    c, h, w = (int(v) for v in everyone[:, 1:].amax(dim=0).tolist())
    piece = local.float() if local is not None else torch.zeros(mine, c, h, w)
    return _gather_shares(strategy, piece, n, rank, world, device)


def merge(shared: Explanations | None, whole: Explanations | None) -> Explanations | None:
    """Two explanations of the same samples as one: ``shared`` extended by ``whole``'s maps,
    extras and errors (either may be ``None``)."""
    if shared is None or whole is None:
        return shared if whole is None else whole
    shared.maps.update(whole.maps)
    shared.extras.update(whole.extras)
    shared.errors.update(whole.errors)
    return shared
