"""Cost of each method per image: seconds and passes (resnet18, 224 px, CPU threads as set).

    python benchmarks/methods.py [--n 2] [--size 224]

Each method alone through ``explain()`` (target layer ``layer4``), best of one warm run; the
passes column counts forward (F) and backward (B) passes of the whole network per image.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from lightning_saliency import available_methods, explain
from lightning_saliency.methods.perturbation import occlusion_window

PASSES = {
    "gradcam": "1F + 1B",
    "gradcam++": "1F + 1B",
    "xgradcam": "1F + 1B",
    "layercam": "1F + 1B",
    "hirescam": "1F + 1B",
    "eigencam": "1F",
    "dff": "1F (+ NMF)",
    "guided_gradcam": "1F + 2B",
    "integrated_gradients": "{steps}F + {steps}B",
    "smoothgrad": "{nt}x{nt_steps}F + {nt}x{nt_steps}B",
    "scorecam": "{channels}F",
    "ablationcam": "{channels}F",
    "occlusion": "{windows}F",
}


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
    side, stride = occlusion_window((args.size, args.size))
    windows = ((args.size - side) // stride + 1) ** 2
    fill = {"steps": 32, "nt": 12, "nt_steps": 8, "channels": 512, "windows": windows}
    base = None
    rows = []
    for name in sorted(available_methods(), key=lambda m: (m != "gradcam", m)):
        run = lambda name=name: explain(model, x, methods=(name,), target_layer="layer4")  # noqa: E731
        run()
        start = time.perf_counter()
        run()
        seconds = (time.perf_counter() - start) / args.n
        base = base or seconds
        rows.append((name, seconds, seconds / base, PASSES[name].format(**fill)))
    print(
        f"resnet18, {args.size} px, {device}, {torch.get_num_threads()} threads, "
        f"per image (batch of {args.n})\n"
    )
    print("| method | s / image | x Grad-CAM | passes / image |\n| --- | --- | --- | --- |")
    for name, seconds, rel, passes in rows:
        print(f"| `{name}` | {seconds:.3f} | {rel:.1f} | {passes} |")


if __name__ == "__main__":
    main()
