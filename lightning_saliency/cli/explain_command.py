"""The ``explain`` command of the command line: load the model and images, explain, draw.

Everything here imports torch, so :mod:`lightning_saliency.cli` imports this module only once
its arguments parse (``--help`` stays instant). Each mistake raises
:class:`CliError`, which the entry point prints as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_saliency.cli.messages import say
from lightning_saliency.engine.explanations import explain, normalize_methods
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.engine.options import parse_option_assignment, resolve_options
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.viz.figures import comparison_figure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def _load_state(path: str, unsafe: bool) -> Any:
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:  # pickle errors name the class that is not allow-listed
        if unsafe:
            raise CliError(f"cannot read {path}: {err}") from err
        raise CliError(
            f"{path} cannot be loaded with weights_only=True ({str(err).splitlines()[0]}); "
            "pass --unsafe-load if you trust the file"
        ) from err


def _state_dict(obj: Any) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CliError("the weights file does not hold a state_dict")
    return obj


def _load_into(model: nn.Module, state: dict[str, Tensor]) -> None:
    keys = set(model.state_dict())
    if not keys & set(state):  # e.g. a LightningModule's "model." prefix
        for prefix in {k.split(".", 1)[0] + "." for k in state}:
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if keys & set(stripped):
                state = stripped
                break
    own = model.state_dict()
    missing = sorted(keys - set(state))
    unexpected = sorted(set(state) - keys)
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label}: {_few(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("other shapes (file vs model)", shapes),
        )
        if items
    ]
    if problems:
        raise CliError("the weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state)


def _few(items: Sequence[str], shown: int = 4) -> str:
    """``a, b, c, d and 12 more``."""
    text = ", ".join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _import(path: str, option: str) -> Any:
    """``MODULE:NAME`` imported (the working directory first on the path)."""
    module_name, _, attr = path.partition(":")
    if not attr or not module_name:
        raise CliError(f"{option} must look like MODULE:NAME, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"cannot import {path}: {err}") from err


def _timm() -> Any:
    """timm, when it is installed (``--arch`` then takes its names too)."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model from ``--model`` (+ ``--checkpoint``) or ``--arch`` (+ ``--weights``)."""
    if bool(args.model) == bool(args.arch):
        raise CliError("pass exactly one of --model MODULE:NAME or --arch NAME")
    if args.arch:
        import torchvision

        state = _state_dict(_load_state(args.weights, args.unsafe_load)) if args.weights else None
        num_classes = args.num_classes
        if num_classes is None and state is not None:
            last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
            num_classes = last[-1].shape[0] if last else 1000
        known = torchvision.models.list_models()
        timm = _timm()
        if args.arch in known:
            model = torchvision.models.get_model(
                args.arch, weights=None, num_classes=num_classes or 1000
            )
        elif timm is not None and args.arch in timm.list_models():
            model = timm.create_model(args.arch, pretrained=False, num_classes=num_classes or 1000)
        else:
            names = known + (timm.list_models() if timm is not None else [])
            close = difflib.get_close_matches(args.arch, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = "torchvision or timm" if timm is not None else "torchvision"
            raise CliError(f"unknown {where} architecture {args.arch!r}{hint}")
        if state is not None:
            _load_into(model, state)
        built: nn.Module = model
        return built
    factory = _import(args.model, "--model")
    import lightning as L

    if args.checkpoint and isinstance(factory, type) and issubclass(factory, L.LightningModule):
        if not os.path.isfile(args.checkpoint):
            raise CliError(f"no such file: {args.checkpoint}")
        try:
            return factory.load_from_checkpoint(
                args.checkpoint, map_location="cpu", weights_only=not args.unsafe_load
            )
        except Exception as err:
            hint = "" if args.unsafe_load else "; pass --unsafe-load if you trust the file"
            raise CliError(
                f"cannot load {args.checkpoint}: {str(err).splitlines()[0]}{hint}"
            ) from err
    try:
        model = factory()
    except TypeError as err:
        raise CliError(
            f"{args.model} cannot be called without arguments ({err}); point --model at a "
            "class whose arguments all have defaults, or at a function that takes none and "
            "returns the model"
        ) from err
    if not isinstance(model, nn.Module):
        raise CliError(f"{args.model} did not return an nn.Module")
    if args.checkpoint:
        _load_into(model, _state_dict(_load_state(args.checkpoint, args.unsafe_load)))
    return model


IMAGE_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def check_images(paths: Sequence[str]) -> None:
    """Every image exists and its header reads, before anything slow (the model) loads."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if not os.path.isfile(path):
            raise CliError(f"no such image: {path}")
        try:
            with _bomb_checked(), Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise CliError(f"cannot read image {path}: {err}") from err
        except Image.DecompressionBombError as err:
            raise CliError(f"image {path} is too large to open safely: {err}") from err


@contextlib.contextmanager
def _bomb_checked() -> Iterator[None]:
    """PIL's decompression-bomb warning (over 89 M pixels) as an error, like its error at 2×."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(str(warning)) from None


def _to_channels(img: Any, channels: int) -> Tensor:
    """A PIL image → ``(channels, H, W)`` floats in ``[0, 1]``, scaled by its real bit depth
    (16-bit PNGs are 0..65535, not saturated at 255)."""
    import numpy as np
    from torchvision.transforms import functional as TF

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = max(float(array.max()), 1.0)
        elif img.mode == "I" and float(array.max()) > 65535:
            top = float(2**32 - 1)
        else:
            top = 65535.0 if img.mode != "I" or float(array.max()) > 255 else 255.0
        grey = torch.from_numpy(array / top).float().clamp(0, 1)[None]
        if channels == 4:
            return torch.cat([grey.expand(3, -1, -1), torch.ones_like(grey)])
        return grey.expand(channels, -1, -1).clone()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    tensor: Tensor = TF.to_tensor(img.convert(mode))
    return tensor


def load_images(
    paths: Sequence[str],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
) -> Tensor:
    """Files → a normalised ``(N, channels, size, size)`` batch (1, 3 or 4 channels)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    batch = []
    for path in paths:
        if not os.path.isfile(path):
            raise CliError(f"no such image: {path}")
        try:
            with _bomb_checked(), Image.open(path) as img:
                pixels = _to_channels(img, channels)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise CliError(f"cannot read image {path}: {err}") from err
        batch.append(_square(TF.normalize(pixels, list(mean), list(std)), size))
    return torch.stack(batch)


def _square(pixels: Tensor, size: int) -> Tensor:
    """A normalised image resized so its longer side is ``size``, its aspect kept, and padded
    to ``size x size`` with zeros (the mean colour once normalised): photographs are not
    squashed."""
    from torchvision.transforms import functional as TF

    h, w = pixels.shape[-2:]
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = TF.resize(pixels[None], list(new), antialias=True)[0]
    top, left = (size - new[0]) // 2, (size - new[1]) // 2
    out = torch.zeros(pixels.shape[0], size, size, dtype=resized.dtype)
    out[:, top : top + new[0], left : left + new[1]] = resized
    return out


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution (or patch embedding) takes; 3 if unknown."""
    for module in model.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int) and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return channels
    return 3


def normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[list[float], list[float]]:
    """``--mean``/``--std`` for ``channels`` (one value stretches to all); the defaults are
    ImageNet's for 3 channels and none otherwise."""
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else [0.0]
    if std is None:
        std = IMAGENET_STD if channels == 3 else [1.0]
    out = []
    for name, values in (("--mean", list(mean)), ("--std", list(std))):
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise CliError(
                f"{name} has {len(values)} values but the model takes {channels} input "
                f"channels; give {channels} (or one for all)"
            )
        out.append(values)
    if any(not v > 0 for v in out[1]):
        raise CliError(f"--std must be > 0 for every channel, got {out[1]}")
    return out[0], out[1]


def check_output(path: str) -> str:
    """The figure's path: an image extension PIL writes, not a directory, in a directory that
    exists (or can be made) and is writable. Checked before any compute."""
    if os.path.isdir(path):
        raise CliError(f"--out {path} is a directory; give a file name such as {path}/saliency.png")
    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_FORMATS:
        raise CliError(
            f"--out {path} needs an image extension ({', '.join(IMAGE_FORMATS[:3])}, ...), "
            f"got {extension or 'none'}"
        )
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CliError(f"--out {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK):
        raise CliError(f"--out {path}: cannot write in {existing}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CliError(f"--out {path} exists and is not writable")
    return path


def positive_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError as err:
        raise CliError(f"--size must be a positive int, got {text!r}") from err
    if size < 8:
        raise CliError(f"--size must be at least 8 pixels, got {size}")
    return size


def _class_names(path: str | None) -> list[str] | None:
    if not path:
        return None
    if not os.path.isfile(path):
        raise CliError(f"no such labels file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise CliError(
            f"labels file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "save it as UTF-8"
        ) from err


def _method_options(methods: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    """``--method-option`` and ``--ig-steps`` as checked, typed method options."""
    chosen: dict[str, dict[str, Any]] = {}
    for text in args.method_option:
        method, option, value = parse_option_assignment(text)
        chosen.setdefault(method, {})[option] = value
    try:
        steps: Any = args.ig_steps if args.ig_steps == "auto" else int(args.ig_steps)
    except ValueError as err:
        raise CliError(
            f"--ig-steps must be a positive int or 'auto', got {args.ig_steps!r}"
        ) from err
    return dict(resolve_options(methods, chosen, {"ig_steps": steps}))


def explain_command(args: argparse.Namespace) -> str:
    """``lightning-saliency explain``: load, explain, draw, save; returns the figure's path."""
    start = time.perf_counter()
    try:
        methods = normalize_methods(args.methods)
        options = _method_options(methods, args)
    except SaliencyConfigError as err:
        raise CliError(str(err)) from err
    if not 0 <= args.alpha <= 1:
        raise CliError("--alpha must be between 0 and 1")
    if args.rows is not None and args.rows < 1:
        raise CliError(f"--rows must be >= 1, got {args.rows}")
    size = positive_size(args.size)
    out_path = check_output(args.out)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CliError("--device cuda asked for, but no CUDA device is available")
    except RuntimeError as err:
        raise CliError(f"bad --device {args.device!r}: {err}") from err
    names = _class_names(args.labels)
    paths = args.image[: args.rows] if args.rows else args.image
    check_images(paths)
    if args.mean is not None or args.std is not None:  # lengths known before the model loads
        normalisation(args.mean, args.std, len(args.mean or args.std or [0]))
    say(f"[1/3] loading the model and {len(paths)} image(s)")
    model = load_model(args).eval().to(device)
    channels = input_channels(model)
    mean, std = normalisation(args.mean, args.std, channels)
    images = load_images(paths, size, mean, std, channels).to(device)
    target: Any = None
    if ":" in args.target:
        target = _import(args.target, "--target")
        if not callable(target):
            raise CliError(f"--target {args.target} is not a function")
    elif args.target != "pred":
        try:
            target = int(args.target)
        except ValueError as err:
            raise CliError(
                f"--target must be a class index, 'pred' or MODULE:FUNCTION, got {args.target!r}"
            ) from err
    slow = any(METHODS[m].cost == "expensive" for m in methods)
    say(
        f"[2/3] explaining with {', '.join(methods)} on {device}"
        + (" (slow methods: this takes a while)" if slow else "")
    )
    try:
        maps = explain(
            model,
            images,
            target,
            methods,
            args.target_layer,
            method_options=options,
            layout=args.layout,
        )
    except SaliencyConfigError as err:
        raise CliError(str(err).splitlines()[0]) from err
    say(f"[3/3] writing {out_path}")
    rows = [os.path.basename(p) for p in paths]
    sign = getattr(args, "sign", "all")
    picture = comparison_figure(images, maps, names, mean, std, args.alpha, rows, sign).cpu()
    from PIL import Image

    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out_path)
    except OSError as err:
        raise CliError(f"cannot write {out_path}: {err}") from err
    say(f"done in {time.perf_counter() - start:.1f} s: {out_path}")
    return str(out_path)
