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

# the thresholds this sweep sets: the named scores (attended_consensus alarms on request only)
SET_HERE = ("corner_enrichment", "small_cue_reliance", "background_reliance")
MASK_SCORES = ("object_enrichment",)
SHOWN = ("corner_enrichment", "small_cue_reliance", "background_reliance", "attended_consensus")
CHANCE = 0.25  # four classes
DEMO_ARGS = [
    "--epochs", "4", "--n-train", "1000", "--n-val", "128", "--size", "40",
    "--methods", "gradcam,integrated_gradients", "--num-samples", "16",
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
    """Each alarming probe's threshold, in the middle (geometric) of the interval where every
    clean run stays at or below 0.67 x threshold and every run of the probe's kind fires at
    1.5 x threshold or more at the epoch its shortcut is learnt; at the interval's low end
    when it is empty. Two significant digits."""
    thresholds = {}
    for score in SET_HERE:
        clean = [v for r in records if r["clean"] for v in values(r, score)]
        low = max(max(clean, default=0.0) / 0.67, 1e-3)
        firing = []
        for r in records:
            learnt = collapse_epoch(r)
            if r["clean"] or NAMED[r["kind"]] != score or learnt is None:
                continue
            firing.append(max(values(r, score, learnt), default=0.0))
        high = min(firing, default=0.0) / 1.5
        raw = math.sqrt(low * high) if high > low else low
        digits = 1 - math.floor(math.log10(raw))
        thresholds[score] = round(raw, digits)
        print(f"{score}: clean runs need >= {low:.3f}, firing needs <= {high:.3f}")
    return thresholds


def first_alarm(
    record: dict[str, Any], score: str, limits: dict[str, float]
) -> tuple[int, float] | None:
    """The first epoch at which a method's judged ``score`` is past its threshold, and the
    value (the most alarming over methods). Read from the judged means, so the thresholds set
    here apply without a second sweep; a method gated by the sanity check has none."""
    from lightning_saliency.evaluate.alarms import tripped

    for epoch in range(len(record["judged"])):
        found = [v for v in values(record, score, epoch) if tripped(v, score, limits[score])]
        if found:
            return epoch, (min(found) if score in MASK_SCORES else max(found))
    return None


def table(records: list[dict[str, Any]], thresholds: dict[str, float]) -> str:
    """README's table on the held-out seeds: for each kind and score, the epoch each seed's
    shortcut was learnt, the epoch its alarm was raised, the firing value over the threshold,
    and the worst value of the kind's clean control over the threshold (in the direction that
    fires). ``attended_consensus`` has no default threshold: its values are shown as they are.
    ``object_enrichment`` needs masks; the other scores do not."""
    from lightning_saliency.evaluate.alarms import default_thresholds

    limits = {**default_thresholds(), **thresholds}
    lines = [
        "| kind | score | learnt at epoch | alarm at epoch | firing value / threshold | "
        "clean control, worst / threshold |",
        "|---|---|---|---|---|---|",
    ]

    def seeds(items: list[Any]) -> str:
        return ", ".join("–" if i is None else str(i) for i in items)

    for kind in KINDS:
        shortcut = [r for r in records if r["kind"] == kind and not r["clean"]]
        clean = [r for r in records if r["kind"] == kind and r["clean"]]
        learnt = [collapse_epoch(r) for r in shortcut]
        for score in (*SHOWN, *MASK_SCORES):
            label = f"`{score}`" + (" (masks)" if score in MASK_SCORES else "")
            label = f"**{label}**" if score == NAMED[kind] else label
            clean_values = [v for r in clean for v in values(r, score)]
            if score not in limits:  # opt-in alarm: the values themselves
                at = [max(values(r, score, e), default=math.nan) if e is not None else math.nan
                      for r, e in zip(shortcut, learnt)]  # fmt: skip
                lines.append(
                    f"| {kind} | {label} (opt-in) | {seeds(learnt)} | – | values "
                    f"{', '.join(f'{v:.2f}' for v in at)} | value {max(clean_values):.2f} |"
                )
                continue
            fired = [first_alarm(r, score, limits) for r in shortcut]
            if score in MASK_SCORES:
                margins = [limits[score] / a[1] for a in fired if a]
                worst = limits[score] / min(clean_values, default=math.inf)
            else:
                margins = [a[1] / limits[score] for a in fired if a]
                worst = max(clean_values, default=0.0) / limits[score]
            lines.append(
                f"| {kind} | {label} | {seeds(learnt)} | "
                f"{seeds([a[0] if a else None for a in fired])} | "
                f"{', '.join(f'{m:.1f}×' for m in margins) or '–'} | {worst:.2f}× |"
            )
    return "\n".join(lines)


def still_learnt(record: dict[str, Any], epoch: int) -> bool:
    """Whether the shortcut is learnt at ``epoch``: accuracy on the broken split below chance
    + 10 points."""
    return bool(record["acc_broken"][epoch] < CHANCE + 0.10)


def set_clearing_margin(records: list[dict[str, Any]], limits: dict[str, float]) -> float:
    """The share of its threshold by which a raised alarm must fall back before it counts
    towards clearing: on the threshold-setting runs, the largest share by which a method's
    named score fell below its threshold, after its alarm, at an epoch where the shortcut was
    still learnt; rounded up to a multiple of 0.05 (at least 0.05)."""
    need = 0.0
    for r in records:
        if r["clean"] or collapse_epoch(r) is None:
            continue
        score = NAMED[r["kind"]]
        raised: set[str] = set()
        for epoch, judged in enumerate(r["judged"]):
            for method, scores in judged.items():
                value = scores.get(score, math.nan)
                if math.isnan(value):
                    continue
                if value > limits[score]:
                    raised.add(method)
                elif method in raised and still_learnt(r, epoch):
                    need = max(need, 1 - value / limits[score])
    return max(0.05, math.ceil(need * 20 - 1e-9) / 20)


def flickers(records: list[dict[str, Any]]) -> int:
    """Alarms cleared while their run's shortcut was still learnt (shortcut runs only)."""
    return sum(
        1
        for r in records
        if not r["clean"]
        for a in r["alarms"]
        if a[5] == "cleared" and still_learnt(r, a[0])
    )


def reuse(path: str) -> list[dict[str, Any]]:
    """The records of an earlier sweep (``--reuse``): thresholds and table without training."""
    with open(path) as f:
        records: list[dict[str, Any]] = json.load(f)["records"]
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "shortcut_kinds.json"))
    parser.add_argument("--reuse", action="store_true", help="read the runs from --out")
    args = parser.parse_args(argv)
    if args.reuse:
        records = reuse(args.out)
    else:
        jobs = [(k, c, s) for s in args.seeds for k in KINDS for c in (False, True)]
        with ProcessPoolExecutor(args.jobs) as pool:
            records = list(pool.map(run, *zip(*jobs)))
    setting = [r for r in records if r["seed"] <= 2]
    held_out = [r for r in records if r["seed"] > 2]
    thresholds = set_thresholds(setting) if setting else {}
    if not args.reuse:
        with open(args.out, "w") as f:
            json.dump({"thresholds": thresholds, "records": records}, f, indent=1)
    print("thresholds set on seeds 0-2:", thresholds)
    from lightning_saliency.evaluate.alarms import default_thresholds
    from lightning_saliency.evaluate.hysteresis import CLEAR_MARGIN

    margin = set_clearing_margin(setting, {**default_thresholds(), **thresholds})
    verdict = "enough" if margin <= CLEAR_MARGIN else "TOO SMALL"
    print(f"clearing margin the learnt cues need on seeds 0-2: {margin:.2f} of the threshold")
    print(f"CLEAR_MARGIN = {CLEAR_MARGIN:.2f}: {verdict}")
    print(f"alarms cleared while the shortcut stayed learnt, seeds 3-5: {flickers(held_out)}")
    if held_out:
        print("\nheld-out seeds 3-5:\n")
        print(table(held_out, thresholds))
    return {"thresholds": thresholds, "records": records}


if __name__ == "__main__":
    main()
