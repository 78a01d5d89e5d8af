"""The score monitor: drift references, per-class and correct-only aggregation, alarm events.

:class:`ScoreMonitor` takes one epoch's
:class:`~lightning_saliency.engine.explanations.Explanations` and returns what to log. It
keeps the public record a user reads after (or during) a run: ``alarms`` (every alarm raised,
cleared and back again) and ``history`` (the scores of each logged epoch). It needs no
Trainer: every rank of a distributed run feeds it the same maps and so holds the same record.

Examples:
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

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.evaluate import alarms as rules
from lightning_saliency.evaluate.hysteresis import AlarmEvent as AlarmEvent  # re-exported
from lightning_saliency.evaluate.hysteresis import Ledger
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
    per_sample: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """method -> score -> ``(N,)`` each sample's value (NaN: not scored), on the maps' device."""


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
    per_sample: dict[str, Tensor]


def _masked_nanmean(table: Tensor, rows: Tensor) -> Tensor:
    """``(S, N)`` values, ``(G, N)`` boolean rows -> ``(S, G)``: the mean of each score over
    each row's samples, NaN values left out (NaN where none is left), as ``nanmean``."""
    present = rows[None] & ~torch.isnan(table)[:, None, :]  # (S, G, N)
    total = torch.where(present, table[:, None, :], torch.zeros_like(table[:, None, :])).sum(-1)
    return total / present.sum(-1)  # 0 / 0 = NaN: nothing to average


def _masked_nanmax(table: Tensor, rows: Tensor) -> Tensor:
    """As :func:`_masked_nanmean`, the largest value instead of the mean."""
    present = rows[None] & ~torch.isnan(table)[:, None, :]  # (S, G, N)
    ninf = torch.full_like(table[:, None, :], -math.inf)
    top = torch.where(present, table[:, None, :], ninf).amax(-1)
    return torch.where(present.any(-1), top, torch.full_like(top, math.nan))


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
    :func:`lightning_saliency.sanity_check`) and class-agnostic methods (the same map for every
    class: ``SaliencyMethod.class_specific``) are scored but never alarm.

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
        self.health_prefix = prefix.replace("saliency", "saliency_health", 1)
        self.insensitive: set[str] = set()  # failed the sanity check: scored, never alarmed
        self.history: list[EpochScores] = []
        self._first: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._alarms = Ledger("alarm")  # about the model
        self._notes = Ledger("note")  # about a method's own health

    @property
    def alarms(self) -> list[AlarmEvent]:
        """Every alarm about the model raised, cleared and back again, in order."""
        return self._alarms.events

    @property
    def notes(self) -> list[AlarmEvent]:
        """Every method-health note (IG's completeness error, dead maps) raised, cleared and
        back again, in order: about the method, never counted as an alarm."""
        return self._notes.events

    def set_insensitive(self, methods: Collection[str]) -> None:
        """Methods that failed the sanity check: their scores are still computed and logged,
        but they raise no alarm, and any they hold is dropped (the record keeps it)."""
        self.insensitive = set(methods)
        self._alarms.drop(self.insensitive)

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
        flagged: set[tuple[str, str]] = set()  # alarms and notes whose 0/1 state is logged
        noted: list[rules.Alarm] = []
        groups = out.targets if labels is None else labels.to(out.targets.device)
        correct = None
        if labels is not None:
            correct = out.logits.argmax(1) == labels.to(out.logits.device)
        errors: dict[str, BaseException] = {}
        per_sample: dict[str, dict[str, Tensor]] = {}
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
            per_sample[method] = scored.per_sample
            means_by_method[method] = scored.means
            per_class_by_method[method] = scored.per_class
            judged_by_method[method] = scored.judged_means
            judged.update(scored.judged)
            flagged |= scored.flagged
            tripped.extend(a for a in scored.tripped if not rules.is_health(a.score))
            noted.extend(a for a in scored.tripped if rules.is_health(a.score))
            self._first.setdefault(method, scored.reference)
            if update_references or method not in self._previous:
                self._previous[method] = scored.reference
        health = {k: v for k, v in judged.items() if rules.is_health(k[1])}
        events = self._alarms.update(epoch, tripped, judged)
        events += self._notes.update(epoch, noted, health)
        for method, score in sorted(flagged):  # the state after hysteresis: 1 if raised
            note = rules.is_health(score)
            ledger, prefix = (
                (self._notes, self.health_prefix) if note else (self._alarms, self.alarm_prefix)
            )
            metrics[f"{prefix}/{method}/{score}"] = float((method, score) in ledger.active)
        metrics[f"{self.alarm_prefix}/count"] = float(len(self._alarms.active))
        record = EpochScores(
            epoch,
            means_by_method,
            per_class_by_method,
            sorted(a.key for a in tripped),
            judged_by_method,
        )
        self.history.append(record)
        return EpochReport(record, metrics, events, errors, per_sample)

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
        model = {k: v for k, v in self.thresholds.items() if not rules.is_health(k)}
        if not METHODS[method].location_alarms:  # where its maps point is not evidence
            model = {k: v for k, v in model.items() if k not in rules.LOCATION_SCORES}
        health = {k: v for k, v in self.thresholds.items() if rules.is_health(k)}
        # a method's health is judged on every sample, also when it failed the sanity check
        all_means = recorded[0] if recorded is not None else means
        found = rules.check(method, all_means, {}, health)
        flagged = {(method, score) for score in health if score in all_means}
        judged.update({(method, score): all_means[score] for score in health if score in all_means})
        # a method that fails the sanity check, or whose maps are the same for every class,
        # is not about the decision: its scores show, never alarm
        alarmable = method not in self.insensitive and METHODS[method].class_specific
        if alarmable:
            alarms = rules.check(method, means, per_class, model)
            found += alarms
            names = {a.score for a in alarms}
            flagged |= {
                (method, score)
                for score in model
                if score in names or score in means or score in logged
            }
            for score in model:
                if score in means or any(score in v for v in per_class.values()):
                    judged[(method, score)] = rules.worst_value(score, means, per_class)
        record_means, record_per_class = recorded or (means, per_class)
        return _MethodScoring(
            metrics,
            record_means,
            record_per_class,
            found,
            judged,
            small,
            flagged,
            means if alarmable else {},
            {k: v.detach() for k, v in scores.items()},
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
        largest = torch.tensor([k in rules.GROUP_SCORES for k in names], device=table.device)
        if bool(largest.any()):  # a group's score: its strongest group, not the average
            means_table = torch.where(largest[:, None], _masked_nanmax(table, rows), means_table)
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
        return sorted(self._alarms.active)

    @property
    def noted(self) -> list[tuple[str, str]]:
        """The ``(method, score)`` method-health notes raised now (not yet cleared)."""
        return sorted(self._notes.active)

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
            **self._alarms.state_dict(),  # "alarms", "active", "safe", "ever" as in 0.2
            "notes": self._notes.state_dict(),
            "history": [asdict(h) for h in self.history],
            "insensitive": sorted(self.insensitive),
        }

    def load_state_dict(self, state: Mapping[str, Any], drop: Collection[str] = ()) -> None:
        """Restore a saved record; the references and open alarms of the methods in ``drop``
        are left out (the alarm record and history keep them: they happened). A state saved
        before notes had their own ledger moves its method-health entries there."""
        self._first = {k: v for k, v in state.get("first", {}).items() if k not in drop}
        previous = state.get("previous", state.get("prev", {}))
        self._previous = {k: v for k, v in previous.items() if k not in drop}
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
        legacy = dict(state)
        for method, score in state.get("alarmed", []):  # 0.1.0: the alarms raised, never cleared
            threshold = self.thresholds.get(score, float("nan"))
            legacy["active"] = [*legacy.get("active", []), [method, score, threshold]]
            legacy["ever"] = [*legacy.get("ever", []), [method, score]]

        def about_model(key: Any) -> bool:
            return key[0] not in drop and not rules.is_health(key[1])

        self._alarms.load_state_dict(legacy, about_model)
        self._alarms.events = [e for e in self._alarms.events if not rules.is_health(e.score)]
        notes = state.get("notes")
        if notes is None:  # saved before the notes' ledger: their entries were alarms
            notes = {**legacy, "alarms": [{**e, "kind": "note"} for e in legacy.get("alarms", [])]}
        self._notes.load_state_dict(
            notes, lambda key: key[0] not in drop and rules.is_health(key[1])
        )
        self._notes.events = [e for e in self._notes.events if rules.is_health(e.score)]
        self.insensitive = {str(m) for m in state.get("insensitive", []) if m not in drop}
