"""The score monitor: drift references, per-class and correct-only aggregation, alarm events.

:class:`ScoreMonitor` takes one epoch's
:class:`~lightning_saliency.engine.explanations.Explanations` and returns what to log. It
keeps the public record a user reads after (or during) a run: ``alarms`` (every alarm raised,
cleared and back again) and ``history`` (the scores of each logged epoch). It needs no
Trainer: every rank of a distributed run feeds it the same maps and so holds the same record.

Example:
    >>> import torch
    >>> from lightning_saliency.engine.explanations import Explanations
    >>> maps = torch.zeros(4, 12, 12); maps[:, :2, :2] = 1.0       # every map in one corner
    >>> out = Explanations({"gradcam": maps}, logits=torch.eye(4), targets=torch.arange(4))
    >>> monitor = ScoreMonitor()
    >>> report = monitor.observe(0, out, labels=torch.arange(4))
    >>> [(e.state, e.method, e.score) for e in report.events]
    [('raised', 'gradcam', 'corner_enrichment'), ('raised', 'gradcam', 'consensus')]
    >>> monitor.history[0].means["gradcam"]["corner_enrichment"] > 3
    True
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.evaluate import alarms as rules
from lightning_saliency.evaluate.scores import (
    SHORTCUT_SCORES,
    SignedMass,
    chance_levels,
    downsample_for_drift,
    map_scores,
)

PER_CLASS_SCORES = (
    "object_enrichment",
    "object_energy",
    "pointing_game",
    "corner_enrichment",
    "dead_maps",
    *SHORTCUT_SCORES,
)
AlarmState = Literal["raised", "cleared", "back"]
CLEAR_AFTER = 2  # logged epochs in a row on the safe side before an alarm is cleared


@dataclass(frozen=True)
class AlarmEvent:
    """A change of one alarm (a method's score against its threshold) at a logged epoch.

    Attributes:
        epoch: the trainer's epoch.
        method, score: which alarm.
        value, threshold: the value that tripped it (or cleared it) and the threshold.
        class_name: the class whose mean tripped it (``None``: the mean over samples).
        state: ``"raised"`` the first time, ``"cleared"`` when back on the safe side,
            ``"back"`` when it trips again after a clear.
    """

    epoch: int
    method: str
    score: str
    value: float
    threshold: float
    class_name: str | None
    state: AlarmState

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.score)

    def message(self) -> str:
        """One line for the console and the logs."""
        op = "<" if self.score in rules.LOW_IS_BAD else ">"
        where = f" for class '{self.class_name}'" if self.class_name else ""
        if self.state == "cleared":
            return (
                f"saliency alarm cleared at epoch {self.epoch}: {self.method} {self.score} = "
                f"{self.value:.2f} (no longer {op} {self.threshold:g})."
            )
        again = " (back again)" if self.state == "back" else ""
        return (
            f"saliency alarm at epoch {self.epoch}{again}: {self.method} {self.score}{where} = "
            f"{self.value:.2f} ({op} {self.threshold:g}): {rules.meaning(self.score)}."
        )


@dataclass(frozen=True)
class EpochScores:
    """The scores of one logged epoch.

    Attributes:
        epoch: the trainer's epoch.
        means: method -> score -> mean over the samples.
        per_class: method -> class name -> score -> mean over that class's samples.
        alarms: the ``(method, score)`` alarms tripped at this epoch.
        judged: method -> score -> the mean the alarms judged (over the correctly classified
            samples when labels are known; empty for a method that raises no alarm).
    """

    epoch: int
    means: dict[str, dict[str, float]]
    per_class: dict[str, dict[str, dict[str, float]]]
    alarms: list[tuple[str, str]] = field(default_factory=list)
    judged: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochReport:
    """What :meth:`ScoreMonitor.observe` found: scalars to log, alarm changes to announce, and
    the methods whose scoring failed (left out of the rest)."""

    scores: EpochScores
    metrics: dict[str, float]
    events: list[AlarmEvent]
    errors: dict[str, BaseException] = field(default_factory=dict)


@dataclass(frozen=True)
class _MethodScoring:
    metrics: dict[str, float]
    means: dict[str, float]
    per_class: dict[str, dict[str, float]]
    tripped: list[rules.Alarm]
    judged: dict[tuple[str, str], float]
    reference: Tensor
    flagged: set[tuple[str, str]]
    judged_means: dict[str, float]


def _masked_nanmean(table: Tensor, rows: Tensor) -> Tensor:
    """``(S, N)`` values, ``(G, N)`` boolean rows -> ``(S, G)``: the mean of each score over
    each row's samples, NaN values left out (NaN where none is left), as ``nanmean``."""
    present = rows[None] & ~torch.isnan(table)[:, None, :]  # (S, G, N)
    total = torch.where(present, table[:, None, :], torch.zeros_like(table[:, None, :])).sum(-1)
    return total / present.sum(-1)  # 0 / 0 = NaN: nothing to average


def _finite(values: dict[str, float]) -> dict[str, float]:
    """Drop NaN scores (every map of the group was dead): nothing to log or alarm on."""
    return {k: v for k, v in values.items() if v == v}


class ScoreMonitor:
    """Scores each logged epoch's maps, keeps drift references and the alarm record.

    Args:
        thresholds: alarm thresholds over :func:`.alarms.default_thresholds`.
        class_names: names for per-class scores (default: the class index).
        prefix: the tag prefix of the means (``saliency``, or ``saliency/<name>``); alarm
            flags and the count go under ``saliency_alarms``, per-class means under
            ``saliency_per_class`` (with the same infix).
        per_class: whether to report per-class means (they are always judged for alarms).
        signed_mass: how signed maps are scored: ``"positive"`` (their evidence for the
            class, default) or ``"absolute"`` (:func:`.scores.relevance`).

    Methods in ``insensitive`` (they failed the sanity check,
    :func:`lightning_saliency.sanity_check`) are scored but never alarm.

    Alarms have hysteresis: raised when a score crosses its threshold, cleared only after
    :data:`CLEAR_AFTER` logged epochs in a row back on the safe side.

    Alarms judge the samples the model classifies correctly when labels are known: right for
    the wrong reason is a shortcut; the maps of a class the model does not know yet mean
    nothing. Per class, at least two correct samples are needed.
    """

    def __init__(
        self,
        thresholds: Mapping[str, float] | None = None,
        class_names: Sequence[str] | None = None,
        prefix: str = "saliency",
        per_class: bool = True,
        signed_mass: SignedMass = "positive",
    ) -> None:
        self.thresholds = rules.merge_thresholds(thresholds)
        self.class_names = list(class_names) if class_names else None
        self.prefix = prefix
        self.alarm_prefix = prefix.replace("saliency", "saliency_alarms", 1)
        self.per_class_prefix = prefix.replace("saliency", "saliency_per_class", 1)
        self.per_class = per_class
        self.signed_mass = signed_mass
        self.insensitive: set[str] = set()  # failed the sanity check: scored, never alarmed
        self._safe: dict[tuple[str, str], int] = {}  # active alarm -> safe epochs in a row
        self.alarms: list[AlarmEvent] = []
        self.history: list[EpochScores] = []
        self._first: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._active: dict[tuple[str, str], float] = {}  # tripped alarm -> its threshold
        self._ever: set[tuple[str, str]] = set()

    def set_insensitive(self, methods: Collection[str]) -> None:
        """Methods that failed the sanity check: their scores are still computed and logged,
        but they raise no alarm, and any they hold is dropped (the record keeps it)."""
        self.insensitive = set(methods)
        for key in [k for k in self._active if k[0] in self.insensitive]:
            self._active.pop(key)
            self._safe.pop(key, None)

    # -- one epoch ------------------------------------------------------------------------------
    def observe(
        self,
        epoch: int,
        out: Explanations,
        labels: Tensor | None = None,
        masks: Tensor | None = None,
        tolerance: int = 1,
        update_references: bool = True,
        extra_scores: Mapping[str, Mapping[str, Tensor]] | None = None,
    ) -> EpochReport:
        """Score the maps of ``out`` (drift against the references), aggregate, check alarms.

        Every logged score is finite: a group whose maps are all dead logs chance
        (:func:`~lightning_saliency.evaluate.scores.chance_levels`), and the first observation of a
        method compares it with itself (drift 1), so a key an ``EarlyStopping`` watches exists
        from the first logged epoch. Alarms judge only real values.

        Args:
            epoch: the trainer's epoch (recorded in history and events).
            out: this epoch's explanations; methods of kind ``"concepts"`` are not scored.
            labels: ``(N,)`` labels: per-class groups and the correct-only alarm rule; without
                them, groups are the explained targets and every sample counts.
            masks: ``(N, H, W)`` object masks: the localisation scores.
            tolerance: the pointing game's tolerance in pixels.
            update_references: ``False`` scores against the references without moving the
                previous-epoch reference (``trainer.validate()`` after ``fit``); the first
                reference is set once either way.
            extra_scores: method -> score -> ``(N,)`` per-sample scores computed elsewhere
                (:func:`~lightning_saliency.shortcut_scores`), aggregated and judged as the
                map scores.
        """
        metrics: dict[str, float] = {}
        means_by_method: dict[str, dict[str, float]] = {}
        per_class_by_method: dict[str, dict[str, dict[str, float]]] = {}
        judged_by_method: dict[str, dict[str, float]] = {}
        tripped: list[rules.Alarm] = []
        judged: dict[tuple[str, str], float] = {}  # alarm -> the value it was judged on
        flagged: set[tuple[str, str]] = set()  # alarms whose 0/1 state is logged
        groups = out.targets if labels is None else labels.to(out.targets.device)
        correct = None
        if labels is not None:
            correct = out.logits.argmax(1) == labels.to(out.logits.device)
        errors: dict[str, BaseException] = {}
        for method, maps in out.items():
            if METHODS[method].kind != "map":
                continue
            try:
                extra = (extra_scores or {}).get(method, {})
                scored = self._score(method, maps, out, groups, correct, masks, tolerance, extra)
            except Exception as err:  # one method's scores never take down the others
                errors[method] = err
                continue
            metrics.update(scored.metrics)
            means_by_method[method] = scored.means
            per_class_by_method[method] = scored.per_class
            judged_by_method[method] = scored.judged_means
            judged.update(scored.judged)
            flagged |= scored.flagged
            tripped.extend(scored.tripped)
            self._first.setdefault(method, scored.reference)
            if update_references or method not in self._previous:
                self._previous[method] = scored.reference
        events = self._update_alarms(epoch, tripped, judged)
        for method, score in sorted(flagged):  # the alarm's state after hysteresis: 1 if raised
            metrics[f"{self.alarm_prefix}/{method}/{score}"] = float(
                (method, score) in self._active
            )
        metrics[f"{self.alarm_prefix}/count"] = float(len(self._active))
        record = EpochScores(
            epoch,
            means_by_method,
            per_class_by_method,
            sorted(a.key for a in tripped),
            judged_by_method,
        )
        self.history.append(record)
        return EpochReport(record, metrics, events, errors)

    def _score(
        self,
        method: str,
        maps: Tensor,
        out: Explanations,
        groups: Tensor,
        correct: Tensor | None,
        masks: Tensor | None,
        tolerance: int,
        extra: Mapping[str, Tensor],
    ) -> _MethodScoring:
        """One method's scores, logged values and alarms; changes no state."""
        small = downsample_for_drift(maps)
        first = self._first.get(method, small)
        scores = map_scores(
            maps, masks, self._previous.get(method, small), first, tolerance, self.signed_mass
        )
        scores.update(self._method_scores(method, out, maps.shape[0], maps.device))
        scores.update({k: v.to(maps.device).float() for k, v in extra.items()})
        chance = chance_levels(masks, maps.shape[0], maps.device)
        logged, logged_per_class = self._group_means(scores, groups, None, fill=chance)
        metrics = {f"{self.prefix}/{method}/{name}": v for name, v in logged.items()}
        for group, values in logged_per_class.items() if self.per_class else ():
            for name, value in values.items():
                metrics[f"{self.per_class_prefix}/{method}/{name}/{group}"] = value
        means, per_class = self._group_means(scores, groups, correct)
        recorded = self._group_means(scores, groups, None) if correct is not None else None
        judged: dict[tuple[str, str], float] = {}
        if method in self.insensitive:  # not model-sensitive: its scores show, never alarm
            found, flagged = [], set()
        else:
            found = rules.check(method, means, per_class, self.thresholds)
            names = {a.score for a in found}
            flagged = {
                (method, score)
                for score in self.thresholds
                if score in names or score in means or score in logged
            }
            for score in self.thresholds:
                if score in means or any(score in v for v in per_class.values()):
                    judged[(method, score)] = means.get(score, float("nan"))
        record_means, record_per_class = recorded or (means, per_class)
        return _MethodScoring(
            metrics,
            record_means,
            record_per_class,
            found,
            judged,
            small,
            flagged,
            {} if method in self.insensitive else means,
        )

    def _method_scores(
        self, method: str, out: Explanations, n: int, device: torch.device
    ) -> dict[str, Tensor]:
        """The numbers a method reports about its own maps, as ``(N,)`` scores."""
        found: dict[str, Tensor] = {}
        for declared in METHODS[method].scores:
            if declared.extra in out.extras:
                value = torch.as_tensor(out.extras[declared.extra], device=device).float()
                found[declared.name] = value.expand(n) if value.dim() == 0 else value
        return found

    def _update_alarms(
        self, epoch: int, tripped: list[rules.Alarm], judged: Mapping[tuple[str, str], float]
    ) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        now = {a.key: a for a in tripped}
        for key, alarm in now.items():
            if key in self._active:
                continue
            state: AlarmState = "back" if key in self._ever else "raised"
            event = AlarmEvent(
                epoch, alarm.method, alarm.score, alarm.value, alarm.threshold, alarm.class_name,
                state,
            )  # fmt: skip
            self._active[key] = alarm.threshold
            self._ever.add(key)
            events.append(event)
        for key in list(self._active):
            if key in now:
                self._safe.pop(key, None)  # tripped again: the safe streak starts over
            elif key in judged:
                self._safe[key] = self._safe.get(key, 0) + 1
                if self._safe[key] >= CLEAR_AFTER:
                    threshold = self._active.pop(key)
                    del self._safe[key]
                    events.append(
                        AlarmEvent(epoch, key[0], key[1], judged[key], threshold, None, "cleared")
                    )
        self.alarms.extend(events)
        return events

    def _group_means(
        self,
        scores: dict[str, Tensor],
        groups: Tensor,
        select: Tensor | None,
        min_count: int = 2,
        fill: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Mean of each score over the selected samples, and per class (groups with fewer than
        ``min_count`` selected samples are left out when a selection is given). A score whose
        maps are all dead in a group is left out, or, with ``fill``, takes the mean of
        ``fill``'s values there."""
        need = 1 if select is None or bool(select.all()) else min_count
        select = torch.ones_like(groups, dtype=torch.bool) if select is None else select
        classes = sorted(set(groups.tolist()))
        # rows: the selection, then each class within it; one host transfer for all the means
        rows = torch.stack([select, *[(groups == c) & select for c in classes]])  # (G, N)
        names = list(scores)
        table = torch.stack([scores[k].float().reshape(-1) for k in names])  # (S, N)
        nan = float("nan")
        fills = torch.stack(
            [
                fill[k].float().reshape(-1) if fill is not None and k in fill else table[0] * nan
                for k in names
            ]
        )
        counts = rows.sum(dim=1).tolist()
        means_table = _masked_nanmean(table, rows)  # (S, G)
        fill_table = _masked_nanmean(fills, rows)
        chosen = torch.where(torch.isnan(means_table), fill_table, means_table).tolist()

        def group(g: int, keys: Sequence[str]) -> dict[str, float]:
            return _finite({k: chosen[i][g] for i, k in enumerate(names) if k in keys})

        means = group(0, names) if counts[0] >= need else {}
        per_class: dict[str, dict[str, float]] = {}
        for g, cls in enumerate(classes, start=1):
            if counts[g] >= need:
                per_class[class_name(self.class_names, int(cls))] = group(g, PER_CLASS_SCORES)
        return means, per_class

    # -- state ----------------------------------------------------------------------------------
    @property
    def raised(self) -> list[tuple[str, str]]:
        """The ``(method, score)`` alarms raised now (not yet cleared)."""
        return sorted(self._active)

    def forget_references(self) -> None:
        """Drop every drift reference (the samples changed size: maps no longer compare);
        the next logged epoch sets them anew. The alarm record and history stay."""
        self._first.clear()
        self._previous.clear()

    @property
    def references(self) -> dict[str, Tensor]:
        """Each method's map at the first logged epoch (drift_first compares against it)."""
        return dict(self._first)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts: loads with ``torch.load(weights_only=True)``."""
        return {
            "first": {k: v.cpu() for k, v in self._first.items()},
            "previous": {k: v.cpu() for k, v in self._previous.items()},
            "alarms": [asdict(e) for e in self.alarms],
            "history": [asdict(h) for h in self.history],
            "active": [[m, s, t] for (m, s), t in self._active.items()],
            "safe": [[m, s, n] for (m, s), n in self._safe.items()],
            "ever": [list(k) for k in sorted(self._ever)],
            "insensitive": sorted(self.insensitive),
        }

    def load_state_dict(self, state: Mapping[str, Any], drop: Collection[str] = ()) -> None:
        """Restore a saved record; the references and open alarms of the methods in ``drop``
        are left out (the alarm record and history keep them: they happened)."""
        self._first = {k: v for k, v in state.get("first", {}).items() if k not in drop}
        previous = state.get("previous", state.get("prev", {}))
        self._previous = {k: v for k, v in previous.items() if k not in drop}
        self.alarms = [AlarmEvent(**e) for e in state.get("alarms", [])]
        self.history = [
            EpochScores(
                h["epoch"],
                h["means"],
                h["per_class"],
                [tuple(a) for a in h["alarms"]],
                h.get("judged", {}),
            )
            for h in state.get("history", [])
        ]
        self._ever = {(str(m), str(s)) for m, s in state.get("ever", [])}
        self._active = {(str(m), str(s)): float(t) for m, s, t in state.get("active", [])}
        self._safe = {(str(m), str(s)): int(n) for m, s, n in state.get("safe", [])}
        self.insensitive = {str(m) for m in state.get("insensitive", []) if m not in drop}
        for method, score in state.get("alarmed", []):  # 0.1.0: the alarms raised, never cleared
            self._ever.add((method, score))
            self._active[(method, score)] = self.thresholds.get(score, float("nan"))
        self._active = {k: v for k, v in self._active.items() if k[0] not in drop}
