"""Cost of each registered method per image (resnet18, 224 px, CPU threads as set), and the
README's methods table: name, what it shows, passes per image and cost class come from the
registry, the seconds from this run.

    python benchmarks/methods.py [--n 2] [--size 224]

Each method alone through ``explain()`` (target layer ``layer4``), after one warm-up run; the
best of 5 runs for the cheap methods, one run for the expensive ones.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from lightning_saliency import explain
from lightning_saliency.methods import DEFAULT_METHODS, METHODS


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    from overhead import realistic_resnet18

    device = torch.device(args.device)
    model = realistic_resnet18().to(device)
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    first = DEFAULT_METHODS[0]
    base = None
    rows = []
    for name in sorted(METHODS, key=lambda m: (m != first, m)):
        run = lambda name=name: explain(model, x, methods=(name,), target_layer="layer4")  # noqa: E731
        run()
        best = float("inf")
        for _ in range(5 if METHODS[name].cost == "cheap" else 1):  # cheap ones: best of 5
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        seconds = best / args.n
        base = base or seconds
        rows.append((METHODS[name], seconds, seconds / base))
    print(
        f"resnet18, {args.size} px, {device}, {torch.get_num_threads()} threads, "
        f"per image (batch of {args.n})\n"
    )
    print(
        f"| method | what it shows | passes / image | cost | s / image | x {first} |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    for spec, seconds, rel in rows:
        shows = spec.description.split(": ", 1)[-1]
        print(
            f"| `{spec.name}` | {shows} | {spec.passes} | {spec.cost} | {seconds:.3f} | {rel:.1f} |"
        )


if __name__ == "__main__":
    main()
