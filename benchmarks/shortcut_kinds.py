"""Which score catches which shortcut, and when: the sweep behind README's table.

Trains the demo (``examples/shortcut_demo.py``: small CNN, 40 px, 4 epochs, 1000 images,
Grad-CAM and IG) on each planted kind (a corner patch, a class-tinted background, a mark at a
random place) and on its clean control, over seeds 0-5. Thresholds of the mask-free probes are
set on seeds 0-2 (the smallest that keeps every clean run at or below 0.67 x threshold, rounded
up) and checked on seeds 3-5, never on the runs that set them. Prints the thresholds, the
held-out table (with masks and without: the mask-free scores do not depend on the masks, so
one run with masks gives both, the "without" column counting only the mask-free scores), and
writes ``benchmarks/shortcut_kinds.json``.

    python benchmarks/shortcut_kinds.py              # the full sweep (~8 min on 2 cores)
    python benchmarks/shortcut_kinds.py --seeds 3    # one seed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("corner", "background", "mark")
NAMED = {  # the score named for each kind: the one that must fire
    "corner": "corner_enrichment",
    "background": "background_reliance",
    "mark": "small_cue_reliance",
}
PROBES = ("small_cue_reliance", "attended_consensus", "background_reliance")
MASK_SCORES = ("object_enrichment",)
CHANCE = 0.25  # four classes
DEMO_ARGS = [
    "--epochs", "4", "--n-train", "1000", "--n-val", "128", "--size", "40",
    "--methods", "gradcam,integrated_gradients",
]  # fmt: skip


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location(
        "shortcut_demo", os.path.join(ROOT, "examples", "shortcut_demo.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(kind: str, clean: bool, seed: int, masks: bool = True) -> dict[str, Any]:
    """One demo run: accuracies, judged scores and alarms per epoch."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("lightning_saliency").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = DEMO_ARGS + ["--shortcut", kind, "--seed", str(seed)]
    args += ["--clean"] if clean else []
    args += [] if masks else ["--no-masks"]
    with tempfile.TemporaryDirectory() as logdir:
        result = _demo().main(args + ["--logdir", logdir])
    callback = result["callback"]
    return {
        "kind": kind,
        "clean": clean,
        "seed": seed,
        "acc": [r["acc"] for r in result["rows"]],
        "acc_broken": [r["acc_broken"] for r in result["rows"]],
        "judged": [h.judged for h in callback.history],
        "alarms": [
            [e.epoch, e.method, e.score, e.value, e.threshold, e.state] for e in callback.alarms
        ],
    }


def collapse_epoch(record: dict[str, Any]) -> int | None:
    """The first epoch at which the shortcut is learnt: accuracy on the broken split below
    chance + 10 points while the intact split is at least chance + 40 points (an untrained
    model is below chance + 10 on both)."""
    for epoch, (acc, broken) in enumerate(zip(record["acc"], record["acc_broken"])):
        if broken < CHANCE + 0.10 and acc >= CHANCE + 0.40:
            return epoch
    return None


def values(record: dict[str, Any], score: str, epoch: int | None = None) -> list[float]:
    """The judged values of ``score`` (every method) at ``epoch`` (every epoch if ``None``)."""
    found = []
    for e, judged in enumerate(record["judged"]):
        if epoch is not None and e != epoch:
            continue
        for scores in judged.values():
            value = scores.get(score, math.nan)
            if not math.isnan(value):
                found.append(value)
    return found


def set_thresholds(records: list[dict[str, Any]]) -> dict[str, float]:
    """The smallest threshold (2 significant digits, rounded up) that keeps every clean run's
    judged score at or below 0.67 x threshold."""
    thresholds = {}
    for score in PROBES:
        clean = [v for r in records if r["clean"] for v in values(r, score)]
        worst = max(clean, default=0.0)
        raw = max(worst / 0.67, 1e-3)
        digits = 1 - math.floor(math.log10(raw))
        thresholds[score] = math.ceil(raw * 10**digits) / 10**digits
    return thresholds


def first_alarm(
    record: dict[str, Any], score: str, limits: dict[str, float]
) -> tuple[int, float] | None:
    """The first epoch at which a method's judged ``score`` is past its threshold, and the
    value (the most alarming over methods). Read from the judged means, so the thresholds set
    here apply without a second sweep; a method gated by the sanity check has none."""
    from lightning_saliency.alarms import tripped

    for epoch in range(len(record["judged"])):
        found = [v for v in values(record, score, epoch) if tripped(v, score, limits[score])]
        if found:
            return epoch, (min(found) if score in MASK_SCORES else max(found))
    return None


def table(records: list[dict[str, Any]], thresholds: dict[str, float]) -> str:
    """README's table on the held-out seeds."""
    from lightning_saliency.alarms import default_thresholds

    limits = {**default_thresholds(), **thresholds}
    lines = [
        "| kind | score | shortcut learnt (epoch, per seed) | alarm epoch, with masks | "
        "alarm epoch, without masks | firing value / threshold | clean runs: worst / "
        "threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        shortcut = [r for r in records if r["kind"] == kind and not r["clean"]]
        clean = [r for r in records if r["kind"] == kind and r["clean"]]
        for score in (NAMED[kind], *[p for p in PROBES if p != NAMED[kind]]):
            learnt = [collapse_epoch(r) for r in shortcut]
            without = [first_alarm(r, score, limits) for r in shortcut]
            with_masks = []
            for r in shortcut:  # with masks, any shortcut score may fire first
                fired = [a for a in (first_alarm(r, s, limits) for s in (score, *MASK_SCORES)) if a]
                with_masks.append(min(fired)[0] if fired else None)
            margins = [a[1] / limits[score] for a in without if a]
            if score in MASK_SCORES:
                margins = [limits[score] / a[1] for a in without if a]
            worst_clean = max((v for r in clean for v in values(r, score)), default=math.nan)

            def seeds(items: list[Any]) -> str:
                return ", ".join("-" if i is None else str(i) for i in items)

            lines.append(
                f"| {kind} | `{score}` | {seeds(learnt)} | {seeds(with_masks)} | "
                f"{seeds([a[0] if a else None for a in without])} | "
                f"{', '.join(f'{m:.1f}x' for m in margins) or '-'} | "
                f"{worst_clean / limits[score]:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "shortcut_kinds.json"))
    args = parser.parse_args(argv)
    jobs = [(k, c, s) for s in args.seeds for k in KINDS for c in (False, True)]
    with ProcessPoolExecutor(args.jobs) as pool:
        records = list(pool.map(run, *zip(*jobs)))
    setting = [r for r in records if r["seed"] <= 2]
    held_out = [r for r in records if r["seed"] > 2]
    thresholds = set_thresholds(setting) if setting else {}
    print("thresholds set on seeds 0-2:", thresholds)
    if held_out:
        print("\nheld-out seeds 3-5:\n")
        print(table(held_out, thresholds))
    with open(args.out, "w") as f:
        json.dump({"thresholds": thresholds, "records": records}, f, indent=1)
    return {"thresholds": thresholds, "records": records}


if __name__ == "__main__":
    main()
