"""Cost of each registered method per image (resnet18, 224 px, CPU threads as set), and the
docs/methods.md's methods table: name, what it shows, passes per image and cost class come from the
registry, the seconds from this run.

    python benchmarks/methods.py [--n 2] [--size 224]

Each method alone through ``explain()`` (target layer ``layer4``), after one warm-up run; the
best of 5 runs for the cheap methods, one run for the expensive ones. Methods whose cost is
``samples`` times one pass over the layer's channels (IS-CAM, SS-CAM: thousands of forwards per
image at 224 px) run with ``samples=1`` and their time is multiplied by their default
``samples`` (marked *); their cost is linear in it.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from lightning_saliency import explain
from lightning_saliency.engine.methods import DEFAULT_METHODS, METHODS


def batch_arguments() -> argparse.Namespace:
    """``--n`` images at ``--size`` px on ``--device`` (2 CPU threads on the CPU): what the
    per-method cost benchmarks run on."""
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    return args


def main() -> None:
    args = batch_arguments()
    from overhead import realistic_resnet18

    device = torch.device(args.device)
    model = realistic_resnet18().to(device)
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    first = DEFAULT_METHODS[0]
    base = None
    rows = []
    for name in sorted(METHODS, key=lambda m: (m != first, m)):
        spec = METHODS[name]
        scaled = spec.cost == "expensive" and "C F" in spec.passes and "samples" in spec.passes
        options = {name: {"samples": 1}} if scaled else None
        factor = spec.options.__dataclass_fields__["samples"].default if scaled else 1

        def run(name: str = name, options: dict | None = options) -> object:
            return explain(model, x, methods=(name,), target_layer="layer4", method_options=options)

        try:
            run()
        except Exception as err:  # refused on this model (DeepLift: resnet's reused ReLUs)
            rows.append((spec, float("nan"), float("nan"), f"refused: {type(err).__name__}"))
            continue
        best = float("inf")
        for _ in range(5 if METHODS[name].cost == "cheap" else 1):  # cheap ones: best of 5
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        seconds = best / args.n * factor
        base = base or seconds
        rows.append((METHODS[name], seconds, seconds / base, "*" if scaled else ""))
    print(
        f"resnet18, {args.size} px, {device}, {torch.get_num_threads()} threads, "
        f"per image (batch of {args.n})\n"
    )
    print(
        f"| method | what it shows | passes / image | cost | s / image | x {first} |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    for spec, seconds, rel, mark in rows:
        shows = spec.description.split(": ", 1)[-1]
        if seconds != seconds:  # not run on this model
            print(f"| `{spec.name}` | {shows} | {spec.passes} | {spec.cost} | {mark} | |")
            continue
        print(
            f"| `{spec.name}` | {shows} | {spec.passes} | {spec.cost} | {seconds:.3f}{mark} | "
            f"{rel:.1f} |"
        )


if __name__ == "__main__":
    main()
