"""What one fit has seen, and saves: :class:`FitRecord`.

A fit's record holds the fixed samples, the target layer and the methods' warm starts (in its
:class:`~.explainer.Explainer`), the drift references and the alarm record (its
:class:`~lightning_saliency.evaluate.monitor.ScoreMonitor`), the timeline, the cadence's count,
the last value of every logged key (held in the metrics between logged runs) and whether the
sanity check ran. ``state_dict`` is made of plain tensors, lists and dicts, so a checkpoint
loads with ``torch.load(weights_only=True)``; a resumed fit loads it and continues the same
story. It also holds, unsaved, what the pre-flight found for display: the normalisation to
undo and the class names.

Examples:
    >>> from lightning_saliency.callback.config import SaliencyConfig
    >>> record = FitRecord(SaliencyConfig.check({"methods": ["gradcam"]}))
    >>> sorted(record.state_dict())[:3]
    ['last_metrics', 'layer_name', 'methods']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_saliency.callback.config import SaliencyConfig
from lightning_saliency.callback.explainer import Explainer
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.evaluate.monitor import ScoreMonitor
from lightning_saliency.viz.figures import Timeline

STATE_VERSION = 2


class FitRecord:
    """The state of one fit (a new fit starts a new record, unless it resumes one).

    Attributes:
        samples: the images explained every logged run (``None`` until chosen).
        explainer: how the engine is called, with the target layer and warm starts.
        monitor: drift references, the alarm record and the scores' history.
        timeline: a method's tiles across logged runs.
        validations: validation runs of this fit seen so far (the cadence's count).
        held: the last value of each logged key, logged again between logged runs.
        fresh: the keys logged anew at the latest validation run.
        sanity_checked: whether this fit's sanity check ran (a resumed fit does not rerun it).
        mean, std, class_names: what the pictures undo and name (found by the pre-flight).
    """

    def __init__(self, config: SaliencyConfig) -> None:
        self.config = config
        self.samples: FixedSamples | None = None
        if config.samples is not None:
            self.samples = FixedSamples.given(config.samples, config.labels, config.masks)
        self.explainer = Explainer(config)
        self.monitor = ScoreMonitor(
            config.thresholds,
            config.class_names,
            config.prefix,
            config.per_class,
            config.signed_mass,
        )
        self.timeline = Timeline()
        self.validations = 0
        self.held: dict[str, float] = {}
        self.fresh: set[str] = set()
        self.sanity_checked = False
        self.mean, self.std = config.mean, config.std
        self.class_names = config.class_names

    def keep(self, fresh: dict[str, float]) -> None:
        """The values logged anew at this validation run; the others keep their last."""
        self.held.update(fresh)
        self.fresh = set(fresh)

    @property
    def display_normalisation(self) -> tuple[list[float] | None, list[float] | None]:
        """The ``mean`` and ``std`` the pictures undo (``None``: none, with
        ``denormalize=False`` or when none is known)."""
        if self.config.denormalize is False:
            return None, None
        return self.mean, self.std

    def set_class_names(self, names: list[str] | None) -> None:
        self.class_names = names
        self.monitor.class_names = names

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts (``torch.load(weights_only=True)`` loads it)."""
        return {
            "version": STATE_VERSION,
            "methods": list(self.config.methods),
            "samples": None if self.samples is None else self.samples.state(),
            "layer_name": self.explainer.layer_name,
            "monitor": self.monitor.state_dict(),
            "timeline": self.timeline.state_dict(),
            "timeline_method": self.config.timeline_method,
            "warm_start": {k: dict(v) for k, v in self.explainer.warm_start.items()},
            "validations": self.validations,
            "last_metrics": dict(self.held),
            "sanity_checked": self.sanity_checked,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> tuple[list[str], bool]:
        """Continue a saved record. What no longer applies (methods not chosen now, another
        timeline method, another target layer) is dropped; returns what was dropped and
        whether the target layer changed, for the caller's message."""
        config = self.config
        if state.get("samples") is not None and config.samples is None:
            self.samples = FixedSamples.from_state(state["samples"])
        saved_methods = list(state.get("methods") or _methods_in(state))
        stale = {m for m in saved_methods if m not in config.methods}
        layer = state.get("layer_name")
        new_layer = bool(isinstance(config.target_layer, str) and layer)
        new_layer = new_layer and config.target_layer != layer
        if new_layer:
            stale |= {m for m in saved_methods if m in METHODS and METHODS[m].needs_layer}
        else:
            self.explainer.layer_name = layer
        self.monitor.load_state_dict(state.get("monitor", state), drop=stale)
        stale |= self._load_timeline(state, stale)
        self.explainer.warm_start = {
            k: dict(v) for k, v in state.get("warm_start", {}).items() if k in config.methods
        }
        self.validations = int(state.get("validations", len(self.monitor.history)))
        self.held = {
            k: float(v)
            for k, v in state.get("last_metrics", {}).items()
            if method_of(k, (config.prefix,)) not in stale
        }
        self.sanity_checked = bool(state.get("sanity_checked", False))
        return sorted(stale), new_layer

    @staticmethod
    def legacy_state(
        checkpoint: Mapping[str, Any], key: str, name: str | None
    ) -> Mapping[str, Any] | None:
        """A 0.1 checkpoint's state of an unnamed callback, saved under a key that held its
        methods and seed (Lightning looks for the new ``key`` only); ``None`` if there is
        none, or the new key is there."""
        states = checkpoint.get("callbacks", {})
        if key in states or name is not None:
            return None
        legacy = [v for k, v in states.items() if k.startswith("SaliencyCallback{'methods'")]
        return legacy[0] if len(legacy) == 1 else None

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The tag prefixes of this callback's keys: means, alarms, per class."""
        monitor = self.monitor
        return (
            monitor.prefix,
            monitor.alarm_prefix,
            monitor.health_prefix,
            monitor.per_class_prefix,
        )

    def _load_timeline(self, state: Mapping[str, Any], stale: set[str]) -> set[str]:
        """The saved timeline, if it shows the method shown now; else what was dropped."""
        timeline = state.get("timeline", {})
        if isinstance(timeline, list):  # 0.1.0: the columns and their labels side by side
            timeline = {"columns": timeline, "labels": state.get("timeline_labels", [])}
        saved = state.get("timeline_method", self.config.timeline_method)
        if saved == self.config.timeline_method and saved not in stale:
            self.timeline.load_state_dict(timeline)
            return set()
        return {f"the timeline of {saved}"} if timeline.get("columns") else set()


def method_of(tag: str, prefixes: tuple[str, ...]) -> str | None:
    """The method a logged tag belongs to, under any of ``prefixes``.

    Examples:
        >>> method_of("saliency/gradcam/consensus", ("saliency", "saliency_alarms"))
        'gradcam'
    """
    for prefix in prefixes:
        if tag.startswith(prefix + "/"):
            return tag[len(prefix) + 1 :].split("/", 1)[0]
    return None


def _methods_in(state: Mapping[str, Any]) -> list[str]:
    """Methods a saved state has references for (states before ``methods`` was saved)."""
    monitor = state.get("monitor", state)
    return list(monitor.get("first", {}))
