"""Alarm thresholds on the scores, and the sentences a user reads when one trips."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Defaults chosen on the demo set not to cry wolf: clean runs stay at object_enrichment >= 2,
# corner_enrichment <= 1.2, consensus <= 0.5; the planted shortcut crosses all three at epoch 0.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "object_enrichment": 1.0,
    "corner_enrichment": 3.0,
    "consensus": 0.8,
    "dead_maps": 0.5,
    "ig_completeness_error": 0.05,
}
LOW_IS_BAD = frozenset({"object_enrichment"})
MEANING: dict[str, str] = {
    "object_enrichment": "attention left the object: the map puts less mass on the labelled "
    "object than an even spread would; the model likely uses background or a planted cue",
    "corner_enrichment": "attention piles up in an image corner: a watermark, logo or patch "
    "shortcut is likely",
    "consensus": "maps of different images agree on one fixed place: objects move, a "
    "shortcut at a fixed location does not",
    "dead_maps": "most maps are zero: the target layer carries no class evidence (dead or "
    "saturated units, or a class coded by the absence of features)",
    "ig_completeness_error": "Integrated Gradients does not add up to the score change: raise "
    "ig_steps (or use ig_steps='auto')",
}


@dataclass(frozen=True)
class Alarm:
    method: str
    score: str
    value: float
    threshold: float
    class_name: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.score)

    def message(self, epoch: int) -> str:
        where = f" for class '{self.class_name}'" if self.class_name else ""
        op = "<" if self.score in LOW_IS_BAD else ">"
        return (
            f"saliency alarm at epoch {epoch}: {self.method} {self.score}{where} = "
            f"{self.value:.2f} ({op} {self.threshold:g}): {MEANING.get(self.score, '')}."
        )


def merge_thresholds(user: Mapping[str, float] | None) -> dict[str, float]:
    """Defaults overridden by the user's; unknown score names are refused."""
    merged = dict(DEFAULT_THRESHOLDS)
    for name, value in (user or {}).items():
        if name not in DEFAULT_THRESHOLDS:
            from lightning_saliency.errors import SaliencyConfigError

            raise SaliencyConfigError(
                f"no alarm for score {name!r}; alarms exist for: {', '.join(DEFAULT_THRESHOLDS)}."
            )
        merged[name] = float(value)
    return merged


def tripped(value: float, score: str, threshold: float) -> bool:
    return value < threshold if score in LOW_IS_BAD else value > threshold


def check(
    method: str,
    means: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]],
    thresholds: Mapping[str, float],
) -> list[Alarm]:
    """Alarms for one method: on the mean over samples, and on any single class's mean (a class
    coded by the absence of features hides in an average).

    Example:
        >>> [a.score for a in check("gradcam", {"corner_enrichment": 6.0}, {}, DEFAULT_THRESHOLDS)]
        ['corner_enrichment']
    """
    alarms = []
    for score, threshold in thresholds.items():
        if score in means and tripped(means[score], score, threshold):
            alarms.append(Alarm(method, score, means[score], threshold))
            continue
        worst = None
        for class_name, values in per_class.items():
            if score in values and tripped(values[score], score, threshold):
                value = values[score]
                if worst is None or (value < worst[1] if score in LOW_IS_BAD else value > worst[1]):
                    worst = (class_name, value)
        if worst is not None and score == "object_enrichment":
            alarms.append(Alarm(method, score, worst[1], threshold, worst[0]))
    return alarms
