"""Cost of lightning-saliency, as ratios measured in one run (never as timed tests).

    python benchmarks/overhead.py            # engine: resnet18, 8 x 224 px, 10 classes
    python benchmarks/overhead.py --fit      # + the callback's cost in a demo-sized fit
    python benchmarks/overhead.py --quick    # smaller shapes, for a smoke run
    python benchmarks/overhead.py --device cuda --n 16   # on a GPU (the default when present)
    python benchmarks/overhead.py --ddp      # only: DDP's shared work, W=1 against W=2

Prints (a) our seconds per method and in total, (b) the floor: the passes the methods need
when they share work, parameters frozen, (c) the naive per-image loop of the tutorials
(pytorch-grad-cam GradCAM, GuidedBackpropReLUModel x CAM, DeepFeatureFactorization, captum IG
with its defaults), then the ratios; IG per image-step against captum given its best
``internal_batch_size`` and against the floor in the largest chunk; ``ig_steps="auto"``'s
evaluations per final step; IG peak memory by chunk size; and with --fit, a demo-sized fit with
and without the callback, the cost per logged epoch against ``explain()`` of the same samples.
The last table holds each ratio against its target.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision

from lightning_saliency import DEFAULT_METHODS, explain
from lightning_saliency.engine.explanations import explanation_context

METHODS = DEFAULT_METHODS
# (what, measured, goal as text, met: True / False, or None when shown but not judged)
Targets = list[tuple[str, float, str, bool | None]]


def settle() -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously: without this, a time is the
    time to launch the kernels, not to run them); nothing on the CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """The fastest of ``repeat`` calls of ``fn`` after one warm-up, in seconds, each timed
    from a settled device to a settled device."""
    fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeat):
        settle()
        start = time.perf_counter()
        fn()
        settle()
        best = min(best, time.perf_counter() - start)
    return best


def floor_passes(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int, chunk: int
) -> dict[str, Callable[[], object]]:
    """The passes the four methods need when they share work, with parameters frozen."""
    layer = model.layer4
    index = torch.arange(x.shape[0], device=x.device)  # every tensor on the model's device

    def shared() -> None:  # one forward; one backward to the layer, one to the input
        kept = {}
        handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
        inp = x.clone().requires_grad_(True)
        out = model(inp)[index, targets].sum()
        handle.remove()
        torch.autograd.grad(out, kept["a"], retain_graph=True)
        torch.autograd.grad(out, inp)

    def forward_layer() -> None:  # Grad-CAM alone: forward + backward to the layer
        kept = {}

        def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            kept["a"] = output.detach().requires_grad_()
            return kept["a"]

        handle = layer.register_forward_hook(keep)
        out = model(x)[index, targets].sum()
        handle.remove()
        torch.autograd.grad(out, kept["a"])

    def forward_only() -> None:  # DFF: one forward
        with torch.no_grad():
            model(x)

    def ig() -> None:  # N x steps images, forward and input-gradient backward, in chunks
        per = max(1, chunk // x.shape[0])
        alphas = torch.linspace(0, 1, steps, device=x.device)
        for start in range(0, steps, per):
            a = alphas[start : start + per]
            batch = (a[:, None, None, None, None] * x[None]).flatten(0, 1).requires_grad_(True)
            rows = torch.arange(batch.shape[0], device=x.device)
            out = model(batch)[rows, targets.repeat(len(a))].sum()
            torch.autograd.grad(out, batch)

    return {"shared": shared, "gradcam": forward_layer, "dff": forward_only, "ig": ig}


def naive_loop(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """The per-image tutorial use of pytorch-grad-cam and captum."""
    from captum.attr import IntegratedGradients
    from pytorch_grad_cam import DeepFeatureFactorization, GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def cams() -> None:
        m = copy.deepcopy(model)
        head_on_cpu = copy.deepcopy(m.fc).cpu()
        for i in range(x.shape[0]):
            img = x[i : i + 1]
            with GradCAM(m, [m.layer4]) as cam:
                mask = cam(img, targets=[ClassifierOutputTarget(int(targets[i]))])
            gb = GuidedBackpropReLUModel(m, device=img.device)(img, target_category=int(targets[i]))
            _ = gb * mask[0][..., None]
            # pytorch-grad-cam scores the concepts with numpy on the CPU: a CPU copy of the head
            dff = DeepFeatureFactorization(m, m.layer4, computation_on_concepts=head_on_cpu)
            dff(img, n_components=4)
            del dff

    def ig() -> None:
        m = copy.deepcopy(model)
        method = IntegratedGradients(m)
        for i in range(x.shape[0]):
            method.attribute(x[i : i + 1], target=int(targets[i]))  # captum defaults: 50 steps

    return {"cams": cams, "ig": ig}


def realistic_resnet18() -> torch.nn.Module:
    """resnet18 with random weights and *trained-looking* BatchNorm statistics. Untouched, a
    random resnet18 is positively homogeneous (no biases, zero BN shifts) and IG is exact at
    any step count, which would flatter the IG numbers."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    return model


def ig_memory_child(chunk: int, steps: int, n: int, size: int) -> None:
    """Peak resident memory of a process that runs one IG call (a fresh process each)."""
    torch.set_num_threads(2)
    model = realistic_resnet18()
    x = torch.randn(n, 3, size, size)
    explain(model, x, methods=("ig",), ig_steps=steps, ig_internal_batch_size=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": chunk, "peak_mb": peak / 1024}))


def ig_memory(steps: int, n: int, size: int, chunks: tuple[int, ...]) -> dict[int, float]:
    out = {}
    for chunk in chunks:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--ig-memory-child",
                str(chunk),
                "--steps",
                str(steps),
                "--n",
                str(n),
                "--size",
                str(size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    return out


def fit_overhead(device: torch.device, epochs: int = 10, repeats: int = 3) -> dict[str, float]:
    """The demo-sized fit (2000 x 48 px train, 2 x 256 val) on ``device`` without the
    callback, with it at default settings every epoch, every 5th and every 10th, after a
    warm-up. Without and every epoch run ``repeats`` times, interleaved; the fastest of each
    counts (the machine's noise, ~0.1 s per epoch on 2 shared cores, only adds time). Also
    ``explain()`` of the callback's samples and methods, on the trained model:
    what the maths of one logged epoch costs."""
    import tempfile

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_saliency import SaliencyCallback
    from lightning_saliency.demos import ShortcutDataModule
    from lightning_saliency.demos.classifier import ShapesClassifier

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    epoch_seconds: dict[str, list[float]] = {"plain": [], "every_1": []}

    class EpochClock(L.Callback):
        """Wall time of each epoch after the first (training, validation, the callback's
        hooks and the writer's share of the CPUs), from one epoch's start to the next's."""

        def __init__(self, into: list[float]) -> None:
            self.into: list[float] = into
            self.start: float | None = None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            settle()
            now = time.perf_counter()
            if self.start is not None and trainer.current_epoch >= 2:
                self.into.append(now - self.start)
            self.start = now

    def run(
        callbacks: list, max_epochs: int = epochs, clock: list[float] | None = None
    ) -> tuple[float, L.LightningModule]:
        L.seed_everything(0)
        model = ShapesClassifier()
        callbacks = callbacks + ([EpochClock(clock)] if clock is not None else [])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=1,
                logger=TensorBoardLogger(tmp),
                callbacks=callbacks,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                num_sanity_val_steps=0,
            )
            start = time.perf_counter()
            trainer.fit(model, ShortcutDataModule())  # the callback's final flush included
            settle()
            return time.perf_counter() - start, model

    run([], 1)  # warm-up
    result: dict[str, float] = {"epochs": float(epochs)}
    plain, every_1 = [], []
    for _ in range(repeats):  # interleaved, so drift of the machine hits both alike
        plain.append(run([], clock=epoch_seconds["plain"])[0])
        callback = SaliencyCallback(every_n_epochs=1)
        seconds, model = run([callback], clock=epoch_seconds["every_1"])
        every_1.append(seconds)
    result["plain"], result["every_1"] = min(plain), min(every_1)
    result["spread"] = max(max(plain) - min(plain), max(every_1) - min(every_1))
    # per epoch: the median over the runs' epochs 1..n-2 (a burst of the machine's noise
    # moves a median less than a fit's total); epoch 0 holds the once-per-fit work
    result["median_plain"] = statistics.median(epoch_seconds["plain"])
    result["median_every_1"] = statistics.median(epoch_seconds["every_1"])
    result["explain"] = explain_seconds(callback, model, device)
    result["sanity"] = sanity_seconds(callback, model, device)
    result["probes"] = probe_seconds(callback, model, device)
    for every in (5, 10):
        result[f"every_{every}"] = run([SaliencyCallback(every_n_epochs=every)])[0]
    return result


def sanity_seconds(callback: Any, model: torch.nn.Module, device: torch.device) -> float:
    """What the callback's once-per-fit sanity check and faithfulness test cost on its samples
    and map methods (its settings: 4 depths, 8 faithfulness steps, 2 random maps)."""
    from lightning_saliency import faithfulness, sanity_check
    from lightning_saliency.callback.trust import FAITHFULNESS_RANDOM_MAPS, FAITHFULNESS_STEPS
    from lightning_saliency.engine.methods import METHODS

    samples = callback.fixed_samples
    model = model.to(device).eval()
    images = samples.images.to(device)
    labels = None if samples.labels is None else samples.labels.to(device)
    methods = [m for m in callback.methods if METHODS[m].kind == "map"]

    def once() -> None:
        out = explain(model, images, labels, methods, callback.layer_name)
        report = sanity_check(model, images, labels, methods, callback.layer_name, original=out)
        faithfulness(
            model,
            images,
            {m: out[m] for m in report.methods},
            out.targets,
            steps=FAITHFULNESS_STEPS,
            random_maps=FAITHFULNESS_RANDOM_MAPS,
        )
        report.picture()

    return timed(once)


def probe_seconds(callback: Any, model: torch.nn.Module, device: torch.device) -> float:
    """What the mask-free shortcut probes cost per logged epoch on the callback's samples and
    map methods (three extra forwards per sample and method, and the crops)."""
    from lightning_saliency import shortcut_scores
    from lightning_saliency.engine.methods import METHODS

    samples = callback.fixed_samples
    model = model.to(device).eval()
    images = samples.images.to(device)
    labels = None if samples.labels is None else samples.labels.to(device)
    methods = [m for m in callback.methods if METHODS[m].kind == "map"]
    out = explain(model, images, labels, methods, callback.layer_name)
    correct = None if labels is None else out.logits.argmax(1) == labels
    return timed(
        lambda: shortcut_scores(model, images, out, out.targets, labels, correct), repeat=3
    )


def explain_seconds(callback: Any, model: torch.nn.Module, device: torch.device) -> float:
    """``explain()`` of the callback's samples, methods and options on ``model``."""
    samples = callback.fixed_samples
    model = model.to(device).eval()
    images = samples.images.to(device)
    labels = None if samples.labels is None else samples.labels.to(device)
    return timed(
        lambda: explain(
            model,
            images,
            labels,
            callback.methods,
            callback.layer_name,
            method_options=callback.method_options,
        ),
        repeat=3,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fit", action="store_true")
    p.add_argument("--fit-only", action="store_true", help="only the demo fit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ig-memory-child", type=int, default=None)
    p.add_argument("--ddp", action="store_true", help="the explanation per epoch at W=1, W=2")
    p.add_argument("--subclass", action="store_true", help="only: what sub-class groups cost")
    p.add_argument("--ddp-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    if args.ig_memory_child is not None:
        return ig_memory_child(args.ig_memory_child, args.steps, args.n, args.size)
    if args.ddp_child is not None:
        return ddp_child(args.ddp_child, args.n)
    if args.quick:
        args.size, args.steps = 96, 16
    torch.set_num_threads(min(2, os.cpu_count() or 1)) if args.device == "cpu" else None
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_saliency").setLevel(logging.ERROR)
    device = torch.device(args.device)
    targets_met: Targets = []
    if not (args.fit_only or args.ddp or args.subclass):
        engine(args, device, targets_met)
    if args.subclass or not (args.fit_only or args.ddp):
        subclass_section(device, targets_met)
    if args.fit or args.fit_only:
        fit_section(device, targets_met)
    if args.ddp:
        ddp_section(args.n, targets_met)
    print(f"\n{'target':<40}{'measured':>10}  {'goal':<12}met")
    for name, value, goal_text, met in targets_met:
        verdict = "-" if met is None else "yes" if met else "NO"  # None: shown, not judged
        print(f"{name:<40}{value:>10.3f}  {goal_text:<12}{verdict}")


def engine(args: argparse.Namespace, device: torch.device, targets_met: Targets) -> None:
    """resnet18 on ``args.n`` images: each method against its floor and the naive loop, IG
    against captum and the floor, ``auto``'s evaluations, IG memory by chunk."""
    torch.manual_seed(0)
    model = realistic_resnet18().to(device)
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    with torch.no_grad():
        targets = model(x).argmax(1)
    chunk = 16
    print(
        f"resnet18, {args.n} x {args.size} px, {device}, {torch.get_num_threads()} threads, "
        f"IG {args.steps} steps, chunk {chunk}\n"
    )

    ours = {
        m: timed(lambda m=m: explain(model, x, targets, methods=(m,), ig_steps=args.steps))
        for m in METHODS
    }
    ours["total"] = timed(lambda: explain(model, x, targets, methods=METHODS, ig_steps=args.steps))
    ours["cams"] = timed(lambda: explain(model, x, targets, methods=METHODS[:3]))

    passes = floor_passes(model, x, targets, args.steps, chunk)
    with explanation_context(model):
        floor = {k: timed(f) for k, f in passes.items()}
    floor_by_method = {
        "gradcam": floor["gradcam"],
        "guided_gradcam": floor["shared"],
        "dff": floor["dff"],
        "integrated_gradients": floor["ig"],
        "cams": floor["shared"],
        "total": floor["shared"] + floor["ig"],
    }

    print(f"{'method':<22}{'ours s':>10}{'floor s':>10}{'ours/floor':>12}")
    for name in (*METHODS, "cams", "total"):
        print(
            f"{name:<22}{ours[name]:>10.3f}{floor_by_method[name]:>10.3f}"
            f"{ours[name] / floor_by_method[name]:>12.2f}"
        )

    naive = (
        naive_loop(model.cpu(), x.cpu(), targets.cpu())
        if device.type == "cpu"
        else naive_loop(model, x, targets)
    )
    naive_cams = timed(naive["cams"])
    print(
        f"\nGrad-CAM + Guided Grad-CAM + DFF: naive per-image loop {naive_cams:.2f} s, "
        f"ours {ours['cams']:.2f} s -> {naive_cams / ours['cams']:.1f}x faster"
    )

    trio = naive_cams / ours["cams"]
    trio_goal = 10.0 if device.type == "cuda" else 3.0  # DESIGN section 6
    targets_met.append(
        ("CAM trio vs naive loop (x faster)", trio, f">= {trio_goal:g}", trio >= trio_goal)
    )

    ig = ig_speed(model, x, targets, args.steps, device)
    print(
        f"\nIG per image-step at {args.steps} steps (Gauss-Legendre): "
        f"ours {ig['ours'] * 1e3:.2f} ms "
        f"(rows per pass: {ig['ours_rows']}), captum {ig['captum'] * 1e3:.2f} ms with its best "
        f"internal_batch_size ({ig['captum_chunk']}), floor {ig['floor'] * 1e3:.2f} ms in one "
        f"chunk of {ig['floor_chunk']} rows"
    )
    versus_captum = ig["captum"] / ig["ours"]
    versus_floor = ig["ours"] / ig["floor"]
    gpu = device.type == "cuda"  # the IG targets are GPU targets; on the CPU: shown
    targets_met.append(
        (
            "IG speed vs captum (x)",
            versus_captum,
            ">= 1.0" if gpu else "(GPU goal)",
            versus_captum >= 1.0 if gpu else None,
        )
    )
    targets_met.append(("IG time vs floor (x)", versus_floor, "<= 1.15", versus_floor <= 1.15))

    auto = explain(model, x, targets, methods=("ig",), ig_steps="auto")
    steps = torch.as_tensor(auto.extras["ig_steps"])
    err = float(auto.extras["ig_completeness_error"].max())
    per_step = auto.extras["ig_evaluations"] / float(steps.sum())
    targets_met.append(("IG auto: evaluations / final steps", per_step, "<= 1.5", per_step <= 1.5))
    ours_auto = timed(lambda: explain(model, x, targets, methods=("ig",), ig_steps="auto"))
    default_cost = ours_auto / ours["integrated_gradients"]  # the default since 0.3 vs 32 steps
    targets_met.append((f"IG default 'auto' / {args.steps} steps (time)", default_cost, "", None))
    naive_ig = timed(naive["ig"], repeat=1) if not args.quick else float("nan")
    print(
        f"IG 'auto': steps per image {steps.tolist()} (completeness error <= {err:.2%}), "
        f"{auto.extras['ig_evaluations']} evaluations = {per_step:.3f} per final step, "
        f"{ours_auto:.2f} s; captum's defaults (50 steps, one image at a time): {naive_ig:.1f} s"
    )

    if device.type == "cpu":
        mem = ig_memory(args.steps, args.n, args.size, (8, 16, 64, args.n * args.steps))
        print(
            "IG: peak process memory by images per pass: "
            + ", ".join(f"{c}: {mb:.0f} MB" for c, mb in mem.items())
        )
    else:
        for c in (8, 16, 64, args.n * args.steps):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            explain(
                model, x, targets, methods=("ig",), ig_steps=args.steps, ig_internal_batch_size=c
            )
            print(
                f"IG peak GPU memory, {c} images per pass: "
                f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MB"
            )


def subclass_section(device: torch.device, targets_met: Targets, classes: int = 4) -> None:
    """What finding sub-class strategies costs per logged run
    (:mod:`lightning_saliency.evaluate.strategies`): the grouping itself against the probes it
    rides on (no extra forward: the crops' likeness is the probes'), and the 16 samples per
    class it needs against the callback's default 16 samples, on the demo's model and images
    (Grad-CAM, 40 px, as the detection benchmark's sub-class study)."""
    from lightning_saliency import shortcut_scores
    from lightning_saliency.demos import ShapesClassifier
    from lightning_saliency.demos.shapes import make_shortcut_images
    from lightning_saliency.evaluate.strategies import sub_class_stamped_cue

    torch.manual_seed(0)
    model = ShapesClassifier(num_classes=classes).to(device).eval()
    data = make_shortcut_images(16 * classes, size=40, seed=0, num_classes=classes)
    images, labels = data["images"].to(device), data["labels"].to(device)

    def per_run(n: int) -> tuple[float, float]:
        out = explain(model, images[:n], labels[:n], ["gradcam"])
        explained = timed(lambda: explain(model, images[:n], labels[:n], ["gradcam"]), repeat=5)
        probed = timed(
            lambda: shortcut_scores(model, images[:n], out, out.targets, labels[:n]), repeat=5
        )
        return explained, probed

    few_explain, few_probes = per_run(16)
    many_explain, many_probes = per_run(16 * classes)
    n = 16 * classes
    similarity = torch.rand(n, n, device=device)
    cue = torch.rand(n, device=device)
    grouping = timed(lambda: sub_class_stamped_cue(similarity, cue, labels, None), repeat=20)
    few, many = few_explain + few_probes, many_explain + many_probes
    print(
        f"\nSub-class strategies on {device} ({classes} classes, Grad-CAM, 40 px): the "
        f"grouping {grouping * 1e3:.2f} ms per logged run, the probes on {n} samples "
        f"{many_probes * 1e3:.1f} ms; explain() + probes {few * 1e3:.1f} ms at 16 samples, "
        f"{many * 1e3:.1f} ms at {n} ({many / few:.2f} x)"
    )
    targets_met.append(
        (
            "sub-class grouping / probes",
            grouping / many_probes,
            "<= 0.10",
            grouping <= 0.1 * many_probes,
        )
    )
    targets_met.append((f"logged run at {n} / at 16 samples", many / few, "(info)", None))


def fit_section(device: torch.device, targets_met: Targets) -> None:
    """The demo fit with and without the callback: its cost per logged epoch."""
    res = fit_overhead(device)
    logged = res["epochs"]
    cost = (res["every_1"] - res["plain"]) / logged
    budget = 1.3 * res["explain"] + 0.05
    print(
        f"\nDemo fit, {logged} epochs on {device}: {res['plain']:.1f} s without the "
        f"callback. Cost per logged epoch (default settings, final flush included): "
        f"{cost:.3f} s; explain() of the same samples and methods: {res['explain']:.3f} s "
        f"(budget 1.3 x that + 0.05 s = {budget:.3f} s); fastest of 3 runs each, "
        f"spread {res['spread']:.1f} s"
    )
    for every in (1, 5, 10):
        t = res[f"every_{every}"]
        print(f"  every_n_epochs={every:<3} {t:.1f} s  overhead {t / res['plain'] - 1:+.1%}")
    once = res["every_10"] - res["plain"]  # setup, the sanity check, one logged epoch
    steady = (res["every_1"] - res["every_10"]) / (logged - 1)  # each further logged epoch
    print(
        f"  the sanity check and faithfulness test alone (once per fit, the explanation of "
        f"its original maps and its figure included): {res['sanity']:.2f} s"
    )
    print(
        f"  the mask-free shortcut probes alone (every logged epoch): {res['probes']:.3f} s "
        f"({res['probes'] / res['explain']:.2f} x explain())"
    )
    print(
        f"  of which once per fit (setup, dry run, sanity check, first logged epoch): "
        f"{once:.2f} s; each further logged epoch: {steady:.3f} s "
        f"({steady / res['explain']:.2f} x explain())"
    )
    targets_met.append(
        ("callback s per logged epoch / budget", cost / budget, "<= 1.0", cost <= budget)
    )
    median_cost = res["median_every_1"] - res["median_plain"]
    print(
        f"  per epoch, the median of each run's epochs 2-{int(logged) - 1}: "
        f"{res['median_plain']:.3f} s without the callback, {res['median_every_1']:.3f} s "
        f"with it: {median_cost:.3f} s per further logged epoch "
        f"({median_cost / res['explain']:.2f} x explain())"
    )
    targets_met.append(
        ("  (further logged epochs only) / budget", steady / budget, "<= 1.0", steady <= budget)
    )
    targets_met.append(
        (
            "  (same, medians of epoch times) / budget",
            median_cost / budget,
            "<= 1.0",
            median_cost <= budget,
        )
    )
    # the once-per-fit trust work spread over the fit's logged epochs (here 10)
    per_epoch_trust = res["sanity"] / logged
    targets_met.append(
        ("  sanity check per logged epoch / budget", per_epoch_trust / budget, "(info)", None)
    )
    overhead = res["every_1"] / res["plain"] - 1
    goal = 0.25 if device.type == "cuda" else 0.15
    targets_met.append(
        ("demo fit overhead, every epoch", overhead, f"<= {goal:+.0%}", overhead <= goal)
    )


def ddp_child(world: int, n: int) -> None:
    """One DDP fit on ``world`` CPU processes (one thread each, gloo) of the demo's model and
    data, 4 epochs with the callback; rank zero prints, as JSON, the callback's seconds per
    logged epoch at its validation-end hook (the median over epochs 1-3; epoch 0 holds the
    once-per-fit sanity check) and the samples its rank explained per map method."""
    import dataclasses
    import tempfile
    import time

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_saliency.callback.explainer as explainer_module
    import lightning_saliency.callback.sharing as sharing_module
    from lightning_saliency import SaliencyCallback
    from lightning_saliency.demos import ShortcutDataModule
    from lightning_saliency.demos.classifier import ShapesClassifier
    from lightning_saliency.engine.methods import METHODS

    torch.set_num_threads(1)
    rows: list[int] = []
    explaining: list[float] = []  # seconds of each step of the explanation

    def timed_step(function: Any, count_rows: bool = False) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            if count_rows:
                rows.append(int(a[1].shape[0]))
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                explaining.append(time.perf_counter() - start)

        return wrapper

    # every step of a rank's explanation: explain() of its share, DFF's layer activations,
    # the gathers and the joint factorisation (the names the callback's modules call)
    explainer_module.explain = timed_step(explain, count_rows=True)  # type: ignore[attr-defined]
    explainer_module.layer_activations = timed_step(explainer_module.layer_activations)
    for name in ("gather_explanations", "gather_activations"):
        setattr(sharing_module, name, timed_step(getattr(sharing_module, name)))
    for method, spec in list(METHODS.items()):
        if spec.joint is not None:
            METHODS[method] = dataclasses.replace(spec, joint=timed_step(spec.joint))

    class Timed(SaliencyCallback):
        seconds: list[float] = []
        explain_seconds: list[float] = []

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            start, calls = time.perf_counter(), len(explaining)
            super().on_validation_epoch_end(trainer, pl_module)
            self.seconds.append(time.perf_counter() - start)
            self.explain_seconds.append(sum(explaining[calls:]))

    callback = Timed(num_samples=n)
    L.seed_everything(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy="ddp" if world > 1 else "auto",
            max_epochs=4,
            logger=TensorBoardLogger(tmp),
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_train_batches=4,
        )
        trainer.fit(ShapesClassifier(), ShortcutDataModule(n_train=512))
    if trainer.global_rank == 0:

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        print(
            json.dumps(
                {
                    "seconds": median(callback.seconds[1:]),
                    "explain": median(callback.explain_seconds[1:]),
                    "rows": rows[-1],
                }
            )
        )


def ddp_section(n: int, targets_met: Targets) -> None:
    """The callback's time per logged epoch at W=1 and W=2 (one thread per process): the
    samples are shared across ranks, so W=2 should take about half, plus the gather."""
    result = {}
    for world in (1, 2):
        proc = subprocess.run(
            [sys.executable, __file__, "--ddp-child", str(world), "--n", str(n)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not line:
            print(f"DDP W={world} failed:\n{proc.stderr[-2000:]}")
            return
        result[world] = json.loads(line[-1])
    ratio = result[2]["explain"] / result[1]["explain"]
    whole = result[2]["seconds"] / result[1]["seconds"]
    print(
        f"\nDDP on the CPU (gloo, one thread per process), {n} samples, per logged epoch on "
        f"rank zero: explanation W=1 {result[1]['explain']:.3f} s ({result[1]['rows']} samples "
        f"per map method), W=2 {result[2]['explain']:.3f} s ({result[2]['rows']} per rank, "
        f"the gathers and DFF's joint NMF included): W=2 / W=1 = {ratio:.2f}. The callback's whole "
        f"hook (scores, probes, pictures on rank zero): W=1 {result[1]['seconds']:.3f} s, "
        f"W=2 {result[2]['seconds']:.3f} s ({whole:.2f})"
    )
    targets_met.append(("DDP explanation W=2 / W=1", ratio, "< 1.0", ratio < 1.0))
    targets_met.append(("DDP whole hook W=2 / W=1", whole, "< 1.0", whole < 1.0))


def ig_speed(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int, device: torch.device
) -> dict[str, float]:
    """Seconds per image-step: ours with its default chunks, captum with the best of a few
    ``internal_batch_size`` values, and the floor (the same forward and input-gradient passes
    in the largest chunk: all rows at once on a GPU, our CPU chunk on the CPU)."""
    from captum.attr import IntegratedGradients

    from lightning_saliency.engine.batching import internal_batch_size

    rows = x.shape[0] * steps
    ours_rows = rows if device.type == "cuda" else internal_batch_size(None, x)
    ours = timed(lambda: explain(model, x, targets, methods=("ig",), ig_steps=steps), repeat=2)
    captum = IntegratedGradients(model)
    best, best_chunk = float("inf"), 0
    for chunk in (16, 64, 256, rows):
        if chunk > rows or (device.type == "cpu" and chunk > 64):
            continue
        t = timed(
            lambda chunk=chunk: captum.attribute(
                x, target=targets, n_steps=steps, internal_batch_size=chunk
            ),
            repeat=2,
        )
        if t < best:
            best, best_chunk = t, chunk
    floor_chunk = rows if device.type == "cuda" else min(rows, ours_rows)
    with explanation_context(model):
        floor = timed(floor_passes(model, x, targets, steps, floor_chunk)["ig"], repeat=2)
    return {
        "ours": ours / rows,
        "ours_rows": min(rows, ours_rows),
        "captum": best / rows,
        "captum_chunk": best_chunk,
        "floor": floor / rows,
        "floor_chunk": floor_chunk,
    }


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
