"""One row per fixed sample, for the loggers that keep tables (W&B): what a person sorts and
filters by when one sample looks wrong.

Columns: the sample's number, the input (with its object mask to toggle where masks exist), its
label, the model's prediction and confidence, each method's tile (as in the grids), and each
method's per-sample scores. Cells are plain: an image is a ``uint8 (H, W, 3)`` array, an image
with a mask an ``(image, mask)`` pair of arrays (the mask ``uint8 (H, W)``, 1 on the object);
:class:`~lightning_saliency.publish.sinks.WandbSink` turns them into ``wandb.Image``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import Explanations


@dataclass
class SampleTable:
    """``columns`` and one row per sample (cells as the module says)."""

    columns: list[str]
    rows: list[list[Any]]


def _array(picture: Tensor) -> Any:
    """A ``(3, H, W)`` picture in 0..1 or 0..255 as ``uint8 (H, W, 3)`` on the host."""
    if picture.dtype != torch.uint8:
        picture = (picture.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return picture.permute(1, 2, 0).contiguous().cpu().numpy()


def sample_table(
    pictures: Tensor,
    tiles: Mapping[str, Tensor],
    out: Explanations,
    labels: Tensor | None,
    names: Sequence[str] | None,
    scores: Mapping[str, Mapping[str, Tensor]],
    masks: Tensor | None = None,
) -> SampleTable:
    """The table of one logged run.

    Args:
        pictures: ``(N, 3, h, w)`` the inputs as shown (the figures' ``picture``).
        tiles: method -> ``(N, 3, h, w)`` its tiles (the figures' ``tiles``).
        out: the explanations (logits, targets).
        labels: ``(N,)`` labels (``None``: the column is left out).
        names: class names.
        scores: method -> score -> ``(N,)`` per-sample scores (the monitor's ``per_sample``).
        masks: ``(N, H, W)`` object masks at the inputs' size.

    Examples:
        >>> out = Explanations({"m": torch.rand(2, 8, 8)}, torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        ...                    torch.tensor([0, 1]))
        >>> table = sample_table(torch.rand(2, 3, 8, 8), {"m": torch.rand(2, 3, 8, 8)}, out,
        ...                      torch.tensor([0, 0]), ["cat", "dog"],
        ...                      {"m": {"consensus": torch.tensor([0.5, float("nan")])}})
        >>> table.columns
        ['sample', 'image', 'label', 'prediction', 'confidence', 'm', 'm/consensus']
        >>> table.rows[1][2:5], table.rows[1][6]
        (['cat', 'dog', 0.731], None)
    """
    n = pictures.shape[0]
    probs = out.logits.detach().float().softmax(1).cpu()
    confidence, predicted = probs.max(1)
    keys = [(m, k) for m, named in scores.items() for k in named]
    stacked = [scores[m][k].detach().float().reshape(-1) for m, k in keys]
    values = torch.stack(stacked).cpu().tolist() if stacked else []  # one host copy
    host_scores = dict(zip(keys, values))
    host_masks = None
    if masks is not None:
        size = tuple(pictures.shape[-2:])
        resized = F.interpolate(masks.detach().float()[:, None].cpu(), size=size, mode="nearest")
        host_masks = resized[:, 0].round().to(torch.uint8).numpy()
    columns = ["sample", "image"] + (["label"] if labels is not None else [])
    columns += ["prediction", "confidence", *tiles, *(f"{m}/{k}" for m, k in host_scores)]
    label_list = None if labels is None else labels.tolist()
    rows = []
    for i in range(n):
        image = _array(pictures[i])
        row: list[Any] = [i, image if host_masks is None else (image, host_masks[i])]
        if label_list is not None:
            row.append(class_name(names, int(label_list[i])))
        row += [class_name(names, int(predicted[i])), round(float(confidence[i]), 3)]
        row += [_array(tile[i]) for tile in tiles.values()]
        row += [None if math.isnan(v[i]) else round(v[i], 4) for v in host_scores.values()]
        rows.append(row)
    return SampleTable(columns, rows)


__all__ = ["SampleTable", "sample_table"]
