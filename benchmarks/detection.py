"""How often a shortcut alarm is right: detection and false-alarm rates on planted cues.

Trains the demo's small CNN (:class:`~lightning_saliency.demos.ShapesClassifier`) with
``SaliencyCallback`` (Grad-CAM and IG at 16 steps, 16 samples, no masks, TensorBoard) on each
*cell*: a carrier (generated shapes, small shapes, scikit-learn's digits, LFW faces / non-faces;
:mod:`carriers`), a planted cue (corner patch, roaming mark, background tint, background
texture, a mark that enters at epoch 2), its correlation with the label ``p`` and the share of a
class that carries it. A base cell per cue and carrier (p = 1, the whole class), then one factor
varied at a time (p = 0.9; 30 % of each class), plus clean controls (no cue, and a mark that
carries no information). Each run is kept in ``benchmarks/results/detection/<cell>/<seed>.json``
as soon as it ends, so an interrupted benchmark resumes where it stopped.

The thresholds of the alarming scores are set on seeds 0-4 of every cell together (one
threshold per score for every carrier) and judged on seeds 5-9, never on the runs that set
them. A run's cue is *learnt* at the first epoch where accuracy on a split where the cue
points to another class falls below chance; it is *detected* when an alarm (any score, any
method; method-health notes are not alarms) is raised at most one logged epoch after that. The
alarms are replayed from the judged scores with the thresholds set here, through the same
:class:`~lightning_saliency.evaluate.hysteresis.Ledger` the callback uses.

    python benchmarks/detection.py                 # every cell, seeds 0-9 (resumes)
    python benchmarks/detection.py --report        # the tables from the kept runs only
    python benchmarks/detection.py --report --write   # ... into benchmarks/README.md
    python benchmarks/detection.py --cells shapes-corner --seeds 0
    python benchmarks/detection.py --report --carriers shapes digits   # thresholds of these
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 6
BATCH, LR = 64, 2e-3  # the demo's
SETTING_SEEDS = range(0, 5)
HELD_OUT_SEEDS = range(5, 10)
METHODS = ("gradcam", "integrated_gradients")
IG_STEPS = 16  # "auto" would be 55 % of a run's time here, for maps these scores read alike
# the scores that may alarm about the model without masks (object_enrichment needs them)
ALARM_SCORES = (
    "corner_enrichment",
    "consensus",
    "small_cue_reliance",
    "stamped_cue_reliance",
    "background_reliance",
    "colour_reliance",
    "texture_reliance",
    "sub_class_stamped_cue",
)
NAMED = {  # the scores meant to catch each cue (the others may fire too)
    "corner": ("corner_enrichment", "consensus", "sub_class_stamped_cue"),
    "mark": ("small_cue_reliance", "stamped_cue_reliance", "sub_class_stamped_cue"),
    "late": ("small_cue_reliance", "stamped_cue_reliance", "sub_class_stamped_cue"),
    "tint": ("background_reliance", "colour_reliance"),
    "texture": ("background_reliance", "texture_reliance"),
}
# the scores of groups of images (lightning_saliency.evaluate.strategies): judged only with
# enough samples per class, so their thresholds come from the sub-class study
GROUP_SCORES = ("sub_class_stamped_cue",)
# The object shows the labelled class on this share of the training images (another class's
# object on the rest): a cue with p = 0.9 or 1 then tells the class better than the object, as
# in the data sets where shortcuts are found. With every digit and face right, the model learnt
# them and never the cue (seeds 0-1: no corner, mark or late cue learnt on either); shapes are
# slower to learn than any cue already, and with wrong ones the clean runs learnt nothing.
OBJECT_AGREEMENT = {"digits": 0.75, "faces": 0.75}
LEARNT_GAP = 0.25
# scores that cannot exceed 1: a threshold above 1 means the score cannot alarm for every carrier
UNIT_SCORES = frozenset(ALARM_SCORES) - {"corner_enrichment"}
CLEAN_KEEP = 0.67  # clean runs of the setting seeds stay at or below this share of a threshold
FIRING_HEADROOM = 1.5  # learnt cues of the setting seeds fire at this many times it, if they can


@dataclass(frozen=True)
class Study:
    """How the runs of a study watch: ``samples`` fixed samples, ``methods``; the model they
    train (``"cnn"``: the demo's; ``"vit"``: :func:`vit_classifier`); its records go to
    ``benchmarks/results/<name>/``."""

    name: str
    samples: int
    methods: tuple[str, ...]
    model: str = "cnn"

    @property
    def results(self) -> str:
        return os.path.join(ROOT, "benchmarks", "results", self.name)


# the main study: every cell, as a user who keeps the defaults' size watches
MAIN = Study("detection", 16, METHODS)
# sub-class strategies need about 16 samples per class (lightning_saliency.evaluate.strategies):
# the cells where 30 % of each class carries a stamped cue (corner, mark), and the clean
# controls, watched by Grad-CAM
SUBCLASS = Study("subclass", 64, ("gradcam",))
# transformers explained as transformers: the corner and mark cells and the clean controls of
# two carriers, on a small ViT trained from scratch, watched by Grad-CAM on its tokens and by
# the attention methods; judged with the shipped thresholds on the held-out seeds only
from lightning_saliency.engine.methods import available_attention_methods  # noqa: E402

VIT = Study(
    "vit",
    16,
    ("gradcam", *available_attention_methods()),
    model="vit",
)
# the carriers this ViT learns in the benchmark's 6 epochs (on shapes it stays at chance, clean
# or with a cue: 0/10 runs learnt the mark, 10/10 the corner; the first 40 runs)
VIT_CARRIERS = ("digits", "faces")
STUDIES = {s.name: s for s in (MAIN, SUBCLASS, VIT)}


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: a carrier, a cue, the cue's agreement with the label ``p`` (``None``:
    a clean control, the cue's class drawn at random; cue ``"none"``: no cue at all) and the
    share of each class's images that carry it."""

    carrier: str
    cue: str
    p: float | None = 1.0
    share: float = 1.0

    @property
    def clean(self) -> bool:
        return self.p is None

    @property
    def name(self) -> str:
        name = f"{self.carrier}-{self.cue}"
        if self.clean:
            return name if self.cue == "none" else f"{name}-clean"
        if self.p != 1.0:
            name += f"-p{self.p:g}"
        if self.share != 1.0:
            name += f"-share{self.share:g}"
        return name


def cells(study: Study = MAIN) -> list[Cell]:
    """The base cell of every cue on every carrier, p = 0.9 and 30 % of a class on each, and
    two clean controls per carrier (no cue; an uninformative mark); the sub-class study has
    the 30 % cells of the stamped cues and the clean controls."""
    from carriers import CARRIERS, CUES

    out: list[Cell] = []
    for carrier in CARRIERS:
        for cue in CUES:
            out += [Cell(carrier, cue), Cell(carrier, cue, p=0.9), Cell(carrier, cue, share=0.3)]
        out += [Cell(carrier, "none", None), Cell(carrier, "mark", None)]
    if study is SUBCLASS:  # what a group of alike attended crops can show: stamped cues
        out = [c for c in out if c.clean or (c.share != 1.0 and c.cue in ("corner", "mark"))]
    if study is VIT:  # the fixed and the roaming stamped cue, where they are learnt at p = 1
        out = [
            c
            for c in out
            if c.carrier in VIT_CARRIERS
            and (c.clean or (c.cue in ("corner", "mark") and c.p == 1.0 and c.share == 1.0))
        ]
    return out


def vit_classifier(num_classes: int, lr: float) -> Any:
    """The demo's classifier with a small torchvision ViT in place of its CNN: the carriers'
    40-px images in 5-px patches (an 8 x 8 grid and a class token), 4 blocks of 4 heads,
    width 64."""
    from carriers import SIZE
    from torchvision.models import VisionTransformer

    from lightning_saliency.demos import ShapesClassifier

    class ViTClassifier(ShapesClassifier):
        def __init__(self) -> None:
            super().__init__(num_classes=num_classes, lr=lr)
            del self.features, self.pool, self.dropout, self.fc
            self.vit = VisionTransformer(
                SIZE, SIZE // 8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                num_classes=num_classes,
            )  # fmt: skip

        def forward(self, x: Any) -> Any:
            return self.vit(x)

    return ViTClassifier()


def _datasets(cell: Cell, seed: int) -> tuple[Any, Any, Any, int, Any]:
    """The training set, the validation set (cue as in training, but p = 1), the broken split
    (every image's cue points to another class), the class count and the epoch clock the
    late cue reads."""
    import torch
    from carriers import LATE_EPOCH, carrier, cue_classes, plant, with_object_agreement

    train, val = carrier(cell.carrier, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    train = with_object_agreement(train, OBJECT_AGREEMENT.get(cell.carrier, 1.0), gen)
    k = train.classes
    clock = EpochClock()
    start = LATE_EPOCH if cell.cue == "late" else 0
    cue = "mark" if cell.cue in ("none", "late") else cell.cue
    share = 0.0 if cell.cue == "none" else cell.share

    def planted(images: Any, p: float | None, share: float) -> Any:
        classes = cue_classes(images.labels, k, p, share, gen)
        return CueSet(plant(images, cue, classes, gen), images, clock, start, k)

    val_p = None if cell.clean else 1.0
    broken_p = None if cell.clean else 0.0
    return (
        planted(train, cell.p, share),
        planted(val, val_p, share),
        planted(val, broken_p, 0.0 if cell.cue == "none" else 1.0),
        k,
        clock,
    )


class EpochClock:
    """The epoch the data is at (a late cue enters at :data:`carriers.LATE_EPOCH`)."""

    epoch = 0


class CueSet:
    """``{"image", "label"}`` items: the planted images from the clock's epoch ``start`` on,
    the carrier's before."""

    def __init__(self, planted: Any, plain: Any, clock: EpochClock, start: int, k: int) -> None:
        self.planted, self.plain, self.labels = planted, plain.images, plain.labels
        self.clock, self.start = clock, start
        self.classes = [f"class {i}" for i in range(k)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = self.planted if self.clock.epoch >= self.start else self.plain
        return {"image": images[index], "label": self.labels[index]}


def run(cell: Cell, seed: int, study: Study = MAIN) -> dict[str, Any]:
    """One training run of ``cell`` at ``seed``: accuracies and the judged scores per epoch."""
    import logging
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_saliency import SaliencyCallback
    from lightning_saliency.demos import ShapesClassifier
    from lightning_saliency.demos.classifier import demo_trainer

    torch.set_num_threads(1)
    for name in ("lightning_saliency", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    L.seed_everything(seed, workers=True, verbose=False)
    train, val, broken, k, clock = _datasets(cell, seed)

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            gen = torch.Generator().manual_seed(seed)
            return DataLoader(train, batch_size=BATCH, shuffle=True, generator=gen)

        def val_dataloader(self) -> Any:
            return [DataLoader(val, batch_size=64), DataLoader(broken, batch_size=64)]

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.acc: list[float] = []
            self.broken: list[float] = []

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            clock.epoch = trainer.current_epoch

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            self.acc.append(float(metrics["val_acc/dataloader_idx_0"]))
            self.broken.append(float(metrics["val_acc/dataloader_idx_1"]))

    saliency = SaliencyCallback(
        methods=list(study.methods), num_samples=study.samples, seed=seed, ig_steps=IG_STEPS
    )
    watch = Watch()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        logger = TensorBoardLogger(logdir, name="run", default_hp_metric=False)
        trainer = demo_trainer(EPOCHS, logger, [saliency, watch])
        if study.model == "vit":
            model = vit_classifier(k, LR)
        else:
            model = ShapesClassifier(num_classes=k, lr=LR)
        trainer.fit(model, Data())
    return {
        "cell": cell.name,
        "carrier": cell.carrier,
        "cue": cell.cue,
        "p": cell.p,
        "share": cell.share,
        "clean": cell.clean,
        "seed": seed,
        "study": study.name,
        "classes": k,
        "acc": watch.acc,
        "acc_broken": watch.broken,
        "judged": [h.judged for h in saliency.history],
        # every method's means, also of those that never alarm (class-agnostic ones)
        "means": [h.means for h in saliency.history],
        "alarms": [  # what the callback raised with its own thresholds during the run
            [e.epoch, e.method, e.score, e.value, e.threshold, e.state] for e in saliency.alarms
        ],
        "seconds": time.perf_counter() - start,
    }


def _path(cell: Cell, seed: int, study: Study = MAIN) -> str:
    return os.path.join(study.results, cell.name, f"{seed}.json")


def run_and_keep(cell: Cell, seed: int, study: Study = MAIN) -> str:
    """Run ``cell`` at ``seed`` unless its record is kept already; the record's path."""
    path = _path(cell, seed, study)
    if not os.path.exists(path):
        record = run(cell, seed, study)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "w") as f:
            json.dump(record, f)
        os.replace(path + ".part", path)  # a run cut short leaves no record
    return path


def load(
    selected: Iterable[Cell], seeds: Iterable[int], study: Study = MAIN
) -> list[dict[str, Any]]:
    """The kept records of ``selected`` cells at ``seeds``."""
    records = []
    for cell in selected:
        for seed in seeds:
            if os.path.exists(_path(cell, seed, study)):
                with open(_path(cell, seed, study)) as f:
                    records.append(json.load(f))
    return records


# --- judging ------------------------------------------------------------------------------


def learnt_epoch(record: dict[str, Any]) -> int | None:
    """The first epoch at which accuracy on the split where the cue lies is below chance, and
    at least :data:`LEARNT_GAP` below the split where it tells the truth (an untrained model
    dips below chance on both by noise)."""
    if record["clean"]:
        return None
    chance = 1.0 / record["classes"]
    for epoch, (acc, broken) in enumerate(zip(record["acc"], record["acc_broken"])):
        if broken < chance and acc - broken >= LEARNT_GAP:
            return epoch
    return None


def values(record: dict[str, Any], score: str, epochs: Iterable[int] | None = None) -> list[float]:
    """The judged values of ``score`` (every method) at ``epochs`` (all when ``None``)."""
    wanted = None if epochs is None else set(epochs)
    return [
        v
        for e, judged in enumerate(record["judged"])
        if wanted is None or e in wanted
        for scores in judged.values()
        for v in [scores.get(score, math.nan)]
        if not math.isnan(v)
    ]


def _significant(value: float) -> float:
    """``value`` rounded up to two significant digits."""
    digits = 1 - math.floor(math.log10(value))
    return math.ceil(value * 10**digits - 1e-9) / 10**digits


def set_thresholds(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One threshold per score for every carrier, from the setting seeds: high enough that
    every clean run stays at or below :data:`CLEAN_KEEP` of it; if the learnt cues the score is
    named for (their values at the epoch they are learnt and the next, the lowest fifth) sit
    above that with :data:`FIRING_HEADROOM` to spare, in the middle (geometric) of the two."""
    out = {}
    for score in ALARM_SCORES:
        clean = [v for r in records if r["clean"] for v in values(r, score)]
        if not clean:  # no clean run judged it (a group score with too few samples per class)
            continue
        low = max(max(clean, default=0.0) / CLEAN_KEEP, 1e-3)
        firing = sorted(
            max(values(r, score, (learnt, learnt + 1)), default=0.0)
            for r in records
            if score in NAMED.get(r["cue"], ()) and (learnt := learnt_epoch(r)) is not None
        )
        high = firing[len(firing) // 5] / FIRING_HEADROOM if firing else 0.0
        out[score] = _significant(math.sqrt(low * high) if high > low else low)
    return out


def replay(record: dict[str, Any], thresholds: dict[str, float], margin: float) -> list[Any]:
    """The alarm events the callback would raise with ``thresholds`` and clearing ``margin``,
    from the run's judged means (the callback's own :class:`Ledger`)."""
    from lightning_saliency.engine.methods import METHODS
    from lightning_saliency.evaluate.alarms import LOCATION_SCORES, Alarm, tripped
    from lightning_saliency.evaluate.hysteresis import Ledger

    ledger = Ledger("alarm", margin=margin)
    for epoch, judged in enumerate(record["judged"]):
        crossed, seen = [], {}
        for method, scores in judged.items():
            for score, threshold in thresholds.items():
                value = scores.get(score, math.nan)
                where = score in LOCATION_SCORES and not METHODS[method].location_alarms
                if math.isnan(value) or where:  # as the monitor: never an alarm for it
                    continue
                seen[(method, score)] = value
                if tripped(value, score, threshold):
                    crossed.append(Alarm(method, score, value, threshold))
        ledger.update(epoch, crossed, seen)
    return ledger.events


@dataclass
class Outcome:
    """What one run's alarms say: the epoch the cue was learnt, the first alarm, whether it
    was in time, the alarms cleared while the cue stayed learnt (``flickers``; ``went_quiet``:
    every alarm of the run cleared while it stayed learnt, what a person watching sees), and
    the epochs under an alarm."""

    learnt: int | None
    first: int | None
    detected: bool
    flickers: int
    went_quiet: bool
    alarmed_epochs: int
    scores: list[str]


def still_learnt(record: dict[str, Any], epoch: int) -> bool:
    """Whether the run reads its cue at ``epoch`` (the test of :func:`learnt_epoch`)."""
    chance = 1.0 / record["classes"]
    broken, acc = record["acc_broken"][epoch], record["acc"][epoch]
    return not record["clean"] and broken < chance and acc - broken >= LEARNT_GAP


def judge(record: dict[str, Any], thresholds: dict[str, float], margin: float) -> Outcome:
    events = replay(record, thresholds, margin)
    learnt = learnt_epoch(record)
    raised = [e for e in events if e.state in ("raised", "back")]
    first = min((e.epoch for e in raised), default=None)
    flickers = sum(1 for e in events if e.state == "cleared" and still_learnt(record, e.epoch))
    active: set[tuple[str, str]] = set()
    alarmed, went_quiet = 0, False
    for epoch in range(len(record["judged"])):
        before = bool(active)
        for e in events:
            if e.epoch == epoch:
                (active.discard if e.state == "cleared" else active.add)(e.key)
        alarmed += bool(active)
        went_quiet |= before and not active and still_learnt(record, epoch)
    detected = learnt is not None and first is not None and first <= learnt + 1
    return Outcome(
        learnt, first, detected, flickers, went_quiet, alarmed, sorted({e.score for e in raised})
    )


def set_margin(records: Sequence[dict[str, Any]], thresholds: dict[str, float]) -> float:
    """The clearing margin the setting seeds need: the largest share of its threshold by which
    the alarm of a score named for the run's cue fell back while the cue stayed learnt and no
    other alarm was past its threshold (alarms clear together), rounded up to 0.05."""
    need = 0.0
    for r in records:
        if r["clean"] or learnt_epoch(r) is None:
            continue
        raised: set[tuple[str, str]] = set()
        for epoch, judged in enumerate(r["judged"]):
            held = any(  # alarms clear together: none clears while one is past its threshold
                scores.get(score, math.nan) > threshold
                for scores in judged.values()
                for score, threshold in thresholds.items()
            )
            for method, scores in judged.items():
                for score in NAMED[r["cue"]]:
                    value, threshold = scores.get(score, math.nan), thresholds.get(score)
                    if math.isnan(value) or threshold is None:
                        continue
                    if value > threshold:
                        raised.add((method, score))
                    elif (method, score) in raised and still_learnt(r, epoch) and not held:
                        need = max(need, 1 - value / threshold)
    return max(0.05, math.ceil(need * 20 - 1e-9) / 20)


def _rate(hits: int, n: int) -> str:
    return f"{hits}/{n}" + (f" ({100 * hits / n:.0f} %)" if n else "")


def report(records: Sequence[dict[str, Any]]) -> str:
    """The markdown tables of ``benchmarks/README.md``: thresholds and margin set on the
    setting seeds, then per cell and pooled per cue kind on the held-out seeds."""
    from lightning_saliency.evaluate.hysteresis import CLEAR_MARGIN

    setting = [r for r in records if r["seed"] in SETTING_SEEDS]
    held = [r for r in records if r["seed"] in HELD_OUT_SEEDS]
    thresholds = set_thresholds(setting)
    margin = set_margin(setting, thresholds)
    lines = _setting_line("Thresholds", setting, held, _listed(thresholds), margin)
    judged = [(r, judge(r, thresholds, CLEAR_MARGIN)) for r in held]
    lines += _cell_table(judged, thresholds)
    lines += ["", "Pooled over carriers (held-out seeds, runs whose cue was learnt):", ""]
    lines += ["| cue | p = 1, whole class | p = 0.9 | 30 % of a class |", "|---|---|---|---|"]
    from carriers import CUES

    for cue in CUES:
        row = [
            _rate(*_pooled(judged, cue, p, share))
            for p, share in ((1.0, 1.0), (0.9, 1.0), (1.0, 0.3))
        ]
        lines.append(f"| {cue} | " + " | ".join(row) + " |")
    return "\n".join(lines + ["", *_summary(records, judged)])


def report_subclass(records: Sequence[dict[str, Any]]) -> str:
    """The sub-class study's tables: the group scores' thresholds set on its setting seeds,
    the others as the callback ships them (the main study's); judged on the held-out seeds,
    with and without the group scores."""
    from lightning_saliency.evaluate.alarms import default_thresholds
    from lightning_saliency.evaluate.hysteresis import CLEAR_MARGIN

    setting = [r for r in records if r["seed"] in SETTING_SEEDS]
    held = [r for r in records if r["seed"] in HELD_OUT_SEEDS]
    shipped = {s: t for s, t in default_thresholds().items() if s in ALARM_SCORES}
    means = {s: t for s, t in shipped.items() if s not in GROUP_SCORES}
    found = set_thresholds(setting)
    groups = {s: t for s, t in found.items() if s in GROUP_SCORES}
    thresholds = {**means, **groups}
    margin = set_margin(setting, thresholds)
    ships = _listed({s: shipped[s] for s in groups if s in shipped})
    set_here = f"{_listed(groups)} (the callback ships {ships}; the other scores at its own)"
    lines = _setting_line("Group-score thresholds", setting, held, set_here, margin)
    judged = [(r, judge(r, thresholds, CLEAR_MARGIN)) for r in held]
    lines += _cell_table(judged, thresholds)
    without = [(r, judge(r, means, CLEAR_MARGIN)) for r in held]
    lines += ["", "Pooled over carriers (held-out seeds, runs whose cue was learnt):", ""]
    lines += [
        "| cue (30 % of a class) | mean scores only | with the group scores |",
        "|---|---|---|",
    ]
    from carriers import CUES

    for cue in CUES:
        row = [_rate(*_pooled(j, cue, 1.0, 0.3)) for j in (without, judged)]
        lines.append(f"| {cue} | " + " | ".join(row) + " |")
    return "\n".join(lines + ["", *_summary(records, judged)])


def _watched_by(record: dict[str, Any], method: str) -> dict[str, Any]:
    """The run as if ``method`` alone watched it. A class-agnostic method's scores are never
    judged (it cannot alarm): its means over every sample stand in, to show what it sees."""
    key = "judged" if any(j.get(method) for j in record["judged"]) else "means"
    return {**record, "judged": [{method: j.get(method, {})} for j in record[key]]}


def report_vit(records: Sequence[dict[str, Any]]) -> str:
    """The ViT study's tables: per method, the held-out runs whose learnt cue it caught in
    time, how many epochs after the cue was learnt, and the clean runs it cried wolf on, with
    the thresholds the callback ships; then each method against Grad-CAM on the tokens."""
    from lightning_saliency.evaluate.alarms import default_thresholds
    from lightning_saliency.evaluate.hysteresis import CLEAR_MARGIN

    thresholds = {s: t for s, t in default_thresholds().items() if s in ALARM_SCORES}
    held = list(records)  # every seed is held out: no threshold was set on these runs
    methods = VIT.methods
    outcome = {
        (r["cell"], r["seed"], m): judge(_watched_by(r, m), thresholds, CLEAR_MARGIN)
        for r in held
        for m in methods
    }
    lines = [
        f"Seeds {min(r['seed'] for r in held)}-{max(r['seed'] for r in held)}, the shipped "
        f"thresholds and clearing margin {CLEAR_MARGIN:g}. A cell: runs whose cue the method "
        "caught in time (at most one logged epoch after it was learnt) / runs that learnt it, "
        "and the epochs from learnt to the first alarm; clean controls: runs with a false "
        "alarm.",
        "",
        "| cell | learnt | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for cell in sorted({r["cell"] for r in held}, key=lambda c: (c.split("-")[0], c)):
        runs = [r for r in held if r["cell"] == cell]
        clean = runs[0]["clean"]
        learnt = [r for r in runs if learnt_epoch(r) is not None]
        row = [cell, "clean" if clean else _rate(len(learnt), len(runs))]
        for m in methods:
            found = [outcome[(r["cell"], r["seed"], m)] for r in (runs if clean else learnt)]
            if clean:
                row.append(f"{sum(o.first is not None for o in found)}/{len(found)} false")
                continue
            lags = [
                o.first - o.learnt for o in found if o.first is not None and o.learnt is not None
            ]
            lag = f", lag {sum(lags) / len(lags):+.1f}" if lags else ""
            row.append(f"{sum(o.detected for o in found)}/{len(found)}{lag}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Each method against Grad-CAM on the tokens, runs that learnt their cue:", ""]
    lines += ["| method | earlier | same epoch | later | only it | only Grad-CAM | neither |"]
    lines += ["|---|---|---|---|---|---|---|"]
    learnt_runs = [r for r in held if learnt_epoch(r) is not None]
    for m in methods[1:]:
        counts = [0] * 6
        for r in learnt_runs:
            ours = outcome[(r["cell"], r["seed"], m)].first
            base = outcome[(r["cell"], r["seed"], "gradcam")].first
            if ours is None or base is None:
                counts[
                    3
                    if base is None and ours is not None
                    else 4
                    if ours is None and base is not None
                    else 5
                ] += 1
            else:
                counts[0 if ours < base else 1 if ours == base else 2] += 1
        lines.append(f"| `{m}` | " + " | ".join(str(c) for c in counts) + " |")
    minutes = sum(r.get("seconds", 0.0) for r in records) / 60
    lines += ["", f"{len(records)} runs, {minutes:.0f} minutes of runs (one core each)."]
    return "\n".join(lines)


def _setting_line(
    what: str,
    setting: Sequence[dict[str, Any]],
    held: Sequence[dict[str, Any]],
    thresholds: str,
    margin: float,
) -> list[str]:
    """The line that says what the setting seeds set and what is judged on."""
    from lightning_saliency.evaluate.hysteresis import CLEAR_MARGIN

    return [
        f"{what} set on seeds {SETTING_SEEDS[0]}-{SETTING_SEEDS[-1]} ({len(setting)} runs): "
        f"{thresholds}; clearing margin needed {margin:.2f} (the callback's `CLEAR_MARGIN` "
        f"is {CLEAR_MARGIN:.2f}). Judged on seeds {HELD_OUT_SEEDS[0]}-{HELD_OUT_SEEDS[-1]} "
        f"({len(held)} runs).",
        "",
    ]


def _listed(thresholds: dict[str, float]) -> str:
    return ", ".join(
        f"`{s}` {t:g}" + (" (off)" if t > 1 and s in UNIT_SCORES else "")
        for s, t in thresholds.items()
    )


def _pooled(
    judged: Sequence[tuple[dict[str, Any], Outcome]], cue: str, p: float, share: float
) -> tuple[int, int]:
    """Detected and learnt held-out runs of ``cue`` at ``p`` and ``share``, over carriers."""
    pool = [
        o
        for r, o in judged
        if r["cue"] == cue
        and not r["clean"]
        and r["p"] == p
        and r["share"] == share
        and o.learnt is not None
    ]
    return sum(o.detected for o in pool), len(pool)


def _cell_table(
    judged: Sequence[tuple[dict[str, Any], Outcome]], thresholds: dict[str, float]
) -> list[str]:
    """A row per cell: learnt, detected in time, delays, alarming scores, flickers; for
    clean cells, the false alarms and the worst value against its threshold."""
    lines = [
        "| cell | learnt (runs) | detected in time | first alarm − learnt | alarms by | "
        "flickers (runs gone quiet) | clean worst / threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    by_cell: dict[str, list[tuple[dict[str, Any], Outcome]]] = {}
    for r, o in judged:
        by_cell.setdefault(r["cell"], []).append((r, o))
    for name, runs in by_cell.items():
        if runs[0][0]["clean"]:
            worst = max(
                max(values(r, s), default=0.0) / t for r, _ in runs for s, t in thresholds.items()
            )
            false = sum(o.first is not None for _, o in runs)
            lines.append(
                f"| {name} (clean) | – | false alarms {_rate(false, len(runs))} | – | "
                f"{', '.join(sorted({s for _, o in runs for s in o.scores})) or '–'} | – | "
                f"{worst:.2f}× |"
            )
            continue
        learnt = [o for _, o in runs if o.learnt is not None]
        delays = sorted(
            o.first - o.learnt for o in learnt if o.first is not None and o.learnt is not None
        )
        lines.append(
            f"| {name} | {len(learnt)}/{len(runs)} | "
            f"{_rate(sum(o.detected for o in learnt), len(learnt))} | "
            f"{', '.join(f'{d:+d}' for d in delays) or '–'} | "
            f"{', '.join(sorted({s for o in learnt for s in o.scores})) or '–'} | "
            f"{sum(o.flickers for o in learnt)} ({sum(o.went_quiet for o in learnt)}) | – |"
        )
    return lines


def _summary(
    records: Sequence[dict[str, Any]], judged: Sequence[tuple[dict[str, Any], Outcome]]
) -> list[str]:
    """False alarms over the clean held-out runs, flickers, and what the runs cost."""
    clean = [(r, o) for r, o in judged if r["clean"]]
    epochs = sum(len(r["judged"]) for r, _ in clean)
    minutes = sum(r.get("seconds", 0.0) for r in records) / 60
    false_runs = sum(o.first is not None for _, o in clean)
    false_epochs = sum(o.alarmed_epochs for _, o in clean)
    return [
        f"Clean runs with a false alarm: {_rate(false_runs, len(clean))}; "
        f"logged epochs under a false alarm: {_rate(false_epochs, epochs)}. "
        f"Alarms cleared while the cue stayed learnt: "
        f"{sum(o.flickers for r, o in judged if not r['clean'])}; runs whose every alarm "
        f"cleared while it stayed learnt: {sum(o.went_quiet for r, o in judged)}.",
        "",
        f"{len(records)} runs, {minutes:.0f} minutes of runs (one core each).",
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default=MAIN.name)
    parser.add_argument("--cells", nargs="+", help="cell names (default: every cell)")
    parser.add_argument("--carriers", nargs="+", help="only these carriers (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[*SETTING_SEEDS, *HELD_OUT_SEEDS])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="no training: tables only")
    parser.add_argument("--write", action="store_true", help="put the tables in README.md")
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    chosen = [
        c
        for c in cells(study)
        if (not args.cells or c.name in args.cells)
        and (not args.carriers or c.carrier in args.carriers)
    ]
    if not args.report:
        todo = [
            (c, s, study)
            for s in args.seeds
            for c in chosen
            if not os.path.exists(_path(c, s, study))
        ]
        start = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool:
            for done, path in enumerate(pool.map(run_and_keep, *zip(*todo)) if todo else [], 1):
                elapsed = time.perf_counter() - start
                where = os.path.relpath(path, ROOT)
                print(f"[{done}/{len(todo)} {elapsed:.0f} s] {where}", flush=True)
    records = load(chosen, range(max(HELD_OUT_SEEDS) + 1), study)
    reports = {MAIN.name: report, SUBCLASS.name: report_subclass, VIT.name: report_vit}
    text = reports[study.name](records)
    print(text)
    if args.write:
        write_readme(text, marker=study.name)
    return text


def write_readme(
    text: str,
    path: str = os.path.join(ROOT, "benchmarks", "README.md"),
    marker: str = MAIN.name,
) -> None:
    """Put ``text`` between the ``marker`` markers of ``benchmarks/README.md``."""
    with open(path) as f:
        page = f.read()
    start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    head, rest = page.split(start)
    _, tail = rest.split(end)
    with open(path, "w") as f:
        f.write(head + start + text + "\n" + end + tail)


if __name__ == "__main__":
    main()
