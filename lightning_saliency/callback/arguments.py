"""The checks of :class:`~lightning_saliency.SaliencyCallback`'s arguments at construction.

Each function checks one argument's type and range and returns it in the form the callback
keeps (a list of labels becomes a tensor, masks become booleans). Each error names the
argument and how to fix it, so a mistake never reaches a training run. What depends on the
model or the data is checked later, by the dry run (:mod:`lightning_saliency.callback.dry_run`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_saliency.errors import SaliencyConfigError


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum``.

    Examples:
        >>> positive_int("num_samples", 4)
        4
        >>> try:
        ...     positive_int("num_samples", 0)
        ... except ValueError as err:
        ...     print(err)
        num_samples must be an int >= 1, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SaliencyConfigError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def samples_tensor(samples: Any) -> Tensor | None:
    """Explicit samples: a float ``(N, C, H, W)`` tensor with ``N >= 1``."""
    if samples is None:
        return None
    if not isinstance(samples, Tensor) or samples.dim() != 4:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise SaliencyConfigError(
            f"samples must be an image tensor of shape (N, C, H, W), got {shape}."
        )
    if samples.shape[0] == 0:
        raise SaliencyConfigError("samples holds 0 images; pass at least one (or leave it None).")
    if not samples.is_floating_point():
        raise SaliencyConfigError(
            f"samples must be float model inputs, got {samples.dtype}; convert as your "
            "transforms do, e.g. samples.float() / 255 and then the model's normalisation."
        )
    return samples


def labels_tensor(labels: Any, count: int | None) -> Tensor | None:
    """Labels of explicit samples: ints (a list, as YAML gives, or a tensor), one per sample,
    none negative.

    Examples:
        >>> labels_tensor([0, 1, 2], 3).tolist()
        [0, 1, 2]
    """
    if labels is None:
        return None
    if count is None:
        raise SaliencyConfigError(
            "labels= belongs to explicit samples=; pass samples= too (labels of sampled "
            "validation images come from the batches)."
        )
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        message = f"labels must be a list of class indices, got {labels!r}."
        raise SaliencyConfigError(message) from err
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise SaliencyConfigError(f"labels must be integer class indices, got {tensor.dtype}.")
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise SaliencyConfigError(
            f"labels must hold one class index per sample ({count}), got shape "
            f"{tuple(tensor.shape)}."
        )
    if bool((tensor < 0).any()):
        raise SaliencyConfigError(f"labels must be >= 0, got {tensor.tolist()}.")
    return tensor.long()


def masks_tensor(masks: Any, samples: Tensor | None) -> Tensor | None:
    """Object masks of explicit samples: ``(N, H, W)`` or ``(N, 1, H, W)``, one per sample, at
    the samples' size; returned as booleans ``(N, H, W)``.

    Examples:
        >>> masks_tensor(torch.ones(2, 1, 4, 4), torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2, 4, 4])
    """
    if masks is None:
        return None
    if samples is None:
        raise SaliencyConfigError(
            "masks= belongs to explicit samples=; pass samples= too (masks of sampled "
            "validation images come from the batches' mask_key)."
        )
    if not isinstance(masks, Tensor):
        raise SaliencyConfigError(f"masks must be a tensor (N, H, W), got {type(masks).__name__}.")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    n, _, h, w = samples.shape
    if masks.dim() != 3 or tuple(masks.shape) != (n, h, w):
        raise SaliencyConfigError(
            f"masks must have shape (N, H, W) = {(n, h, w)} to match samples, got "
            f"{tuple(masks.shape)}."
        )
    found: Tensor = masks != 0
    return found


def normalisation(
    mean: Any, std: Any, channels: int | None = None
) -> tuple[list[float] | None, list[float] | None]:
    """``mean`` and ``std`` to undo for display: both or neither, one finite number per
    channel, ``std > 0``.

    Examples:
        >>> normalisation([0.5, 0.5, 0.5], [0.2, 0.2, 0.2], channels=3)
        ([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    """
    if mean is None and std is None:
        return None, None
    if (mean is None) != (std is None):
        raise SaliencyConfigError("pass both mean= and std= (or neither).")
    values = {}
    for name, given in (("mean", mean), ("std", std)):
        try:
            values[name] = [float(v) for v in given]
        except (TypeError, ValueError) as err:
            raise SaliencyConfigError(f"{name} must be a list of numbers, got {given!r}.") from err
        if not all(math.isfinite(v) for v in values[name]):
            raise SaliencyConfigError(f"{name} must be finite numbers, got {given!r}.")
    if len(values["mean"]) != len(values["std"]):
        raise SaliencyConfigError(
            f"mean has {len(values['mean'])} values and std {len(values['std'])}; give one "
            "per input channel to each."
        )
    if any(v <= 0 for v in values["std"]):
        raise SaliencyConfigError(f"std must be > 0 for every channel, got {values['std']}.")
    if channels is not None and len(values["mean"]) != channels:
        raise SaliencyConfigError(
            f"mean and std have {len(values['mean'])} values but the images have {channels} "
            "channels; give one value per channel."
        )
    return values["mean"], values["std"]


def method_cadences(given: Any, methods: Sequence[str], canonical: Any) -> dict[str, int]:
    """``method_every_n_epochs``: methods that are in ``methods``, each with an int ``>= 1``."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise SaliencyConfigError(
            f"method_every_n_epochs must be a dict of method -> int, got {given!r}."
        )
    out: dict[str, int] = {}
    for key, value in given.items():
        method = canonical(key)
        if method not in methods:
            raise SaliencyConfigError(
                f"method_every_n_epochs names {key!r}, which is not among methods="
                f"{tuple(methods)}; add it to methods or drop it."
            )
        out[method] = positive_int(f"method_every_n_epochs[{key!r}]", value)
    return out


def class_names_list(names: Any) -> list[str] | None:
    """``class_names``: a list of strings."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise SaliencyConfigError(
            f"class_names must be a list of names, one per class, got {names!r}."
        )
    return [str(n) for n in names]


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def callback_name(name: Any) -> str | None:
    """``name``: letters, digits, ``_``, ``.`` and ``-`` (it becomes a tag segment)."""
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.match(name):
        raise SaliencyConfigError(
            f"name must be letters, digits, '_', '.' or '-' (it becomes part of every tag), "
            f"got {name!r}."
        )
    return name


def one_of(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise SaliencyConfigError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    return value


def display_sign(
    value: Any,
    methods: Sequence[str],
    signed: Sequence[str],
    canonical: Callable[[str], str],
) -> str | dict[str, str]:
    """Which part of signed maps the pictures show (captum's ``sign`` choices): one for every
    signed method, or a dict ``{method: sign}`` naming methods among ``methods`` whose maps are
    ``signed``.

    Examples:
        >>> display_sign({"m": "positive"}, ["m"], ["m"], str)
        {'m': 'positive'}
    """
    from lightning_saliency.viz.render import SIGNS

    if isinstance(value, str):
        return str(one_of("sign", value, SIGNS))
    if not isinstance(value, Mapping):
        raise SaliencyConfigError(
            f"sign must be one of {list(SIGNS)} or a dict method -> sign, got {value!r}."
        )
    chosen: dict[str, str] = {}
    for key, sign in value.items():
        method = canonical(key)
        if method not in methods:
            raise SaliencyConfigError(
                f"sign names {key!r}, which is not among methods={tuple(methods)}."
            )
        if method not in signed:
            raise SaliencyConfigError(
                f"sign[{key!r}]: {method}'s maps are never negative, so they have no sign to "
                f"choose; name a signed method ({', '.join(signed)})."
            )
        chosen[method] = str(one_of(f"sign[{key!r}]", sign, SIGNS))
    return chosen
