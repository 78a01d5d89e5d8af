"""``lightning-saliency explain``: a comparison figure of saliency methods for your own images.

    lightning-saliency explain --arch resnet18 --weights resnet18.pth --image cat.jpg \\
        --methods gradcam,guided_gradcam,dff,ig --out cat_saliency.png
    lightning-saliency explain --model my_pkg.models:LitClassifier --checkpoint last.ckpt \\
        --image a.png --image b.png --target pred

Nothing is downloaded: ``--arch`` builds the torchvision architecture with random weights and
loads ``--weights`` if given. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.explain import explain, normalize_methods
from lightning_saliency.figures import comparison_figure
from lightning_saliency.methods import DEFAULT_METHODS, METHODS, available_methods
from lightning_saliency.options import parse_option_assignment, resolve_options

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-saliency",
        description="Saliency maps for image classifiers (lightning-saliency).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "explain",
        help="render a comparison figure of saliency methods for one or more images",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model (one of --model or --arch)")
    model.add_argument(
        "--model",
        metavar="MODULE:NAME",
        help="import path of an nn.Module / LightningModule class or a factory "
        "function, e.g. my_pkg.models:LitClassifier",
    )
    model.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights for --model: a Lightning .ckpt or a state_dict file "
        "(loaded with weights_only=True)",
    )
    model.add_argument(
        "--arch",
        metavar="NAME",
        help="a torchvision architecture by name, e.g. resnet18 (random weights unless --weights)",
    )
    model.add_argument("--weights", metavar="PATH", help="state_dict file for --arch")
    model.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of --arch (default: read from --weights, else 1000)",
    )
    model.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints that need weights_only=False (trusted files only)",
    )
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="PATH",
        help="an image file; repeat for several",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated; one of: " + ", ".join(available_methods()),
    )
    p.add_argument("--target", default="pred", help="class index to explain, or 'pred'")
    p.add_argument(
        "--target-layer",
        default=None,
        metavar="NAME",
        help="dotted module path; default: the last spatial feature map",
    )
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE")
    p.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="normalisation")
    p.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="normalisation")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the maps (0..1)")
    p.add_argument("--rows", type=int, default=None, help="show at most N images (rows)")
    p.add_argument("--ig-steps", default="32", help="IG steps, or 'auto'")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="any option of a chosen method (repeat for several); "
        "lightning_saliency.available_options() lists every method's options and defaults",
    )
    p.add_argument("--out", default="saliency.png", metavar="FIGURE.png", help="output figure")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def _say(message: str) -> None:
    print(f"lightning-saliency: {message}", file=sys.stderr, flush=True)


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
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CliError(f"the weights do not fit the model: {str(err).splitlines()[0]}") from err


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
        try:
            model = torchvision.models.get_model(
                args.arch, weights=None, num_classes=num_classes or 1000
            )
        except ValueError as err:
            raise CliError(f"unknown torchvision architecture {args.arch!r}") from err
        if state is not None:
            _load_into(model, state)
        built: nn.Module = model
        return built
    module_name, _, attr = args.model.partition(":")
    if not attr:
        raise CliError(f"--model must look like MODULE:NAME, got {args.model!r}")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"cannot import {args.model}: {err}") from err
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
    model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"{args.model} did not return an nn.Module")
    if args.checkpoint:
        _load_into(model, _state_dict(_load_state(args.checkpoint, args.unsafe_load)))
    return model


def load_images(
    paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """Files → a normalised ``(N, 3, size, size)`` batch."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    batch = []
    for path in paths:
        if not os.path.isfile(path):
            raise CliError(f"no such image: {path}")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as err:
            raise CliError(f"cannot read image {path}: {err}") from err
        batch.append(TF.normalize(TF.to_tensor(img), mean, std))
    return torch.stack(batch)


def _class_names(path: str | None) -> list[str] | None:
    if not path:
        return None
    if not os.path.isfile(path):
        raise CliError(f"no such labels file: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


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
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CliError("--device cuda asked for, but no CUDA device is available")
    except RuntimeError as err:
        raise CliError(f"bad --device {args.device!r}: {err}") from err
    names = _class_names(args.labels)
    paths = args.image[: args.rows] if args.rows else args.image
    _say(f"[1/3] loading the model and {len(paths)} image(s)")
    model = load_model(args).eval().to(device)
    images = load_images(paths, args.size, args.mean, args.std).to(device)
    target: Any = None
    if args.target != "pred":
        try:
            target = int(args.target)
        except ValueError as err:
            raise CliError(
                f"--target must be a class index or 'pred', got {args.target!r}"
            ) from err
    slow = any(METHODS[m].cost == "expensive" for m in methods)
    _say(
        f"[2/3] explaining with {', '.join(methods)} on {device}"
        + (" (slow methods: this takes a while)" if slow else "")
    )
    try:
        maps = explain(model, images, target, methods, args.target_layer, method_options=options)
    except SaliencyConfigError as err:
        raise CliError(str(err).splitlines()[0]) from err
    _say(f"[3/3] writing {args.out}")
    picture = comparison_figure(images, maps, names, args.mean, args.std, args.alpha).cpu()
    from PIL import Image

    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(args.out)
    _say(f"done in {time.perf_counter() - start:.1f} s: {args.out}")
    return str(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-saliency`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "explain":
            explain_command(args)
        return 0
    except CliError as err:
        _say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
