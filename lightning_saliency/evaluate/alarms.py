"""Alarm thresholds on the scores, and the sentences a user reads when one trips.

Map scores (:mod:`.scores`) have their thresholds here; scores that a method
measures about its own maps (IG's completeness error) bring theirs in the method's record
(``SaliencyMethod.scores``), so :func:`default_thresholds` is the union of both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lightning_saliency.engine.methods import METHODS
from lightning_saliency.errors import SaliencyConfigError

# object_enrichment and dead_maps were chosen on the demo set not to cry wolf (clean runs stay at
# object_enrichment >= 2). The mask-free scores (corner_enrichment, consensus and the probes) are
# set by benchmarks/detection.py on seeds 0-4 of 68 cells (4 carriers: generated shapes, small
# shapes, scikit-learn's digits, LFW faces; 5 cues, each at p = 1, p = 0.9 and on 30 % of a
# class; clean controls), one threshold per score for every carrier: every clean run at or
# below 0.67 x, in the middle of that and the learnt cues where they leave room; judged on
# seeds 5-9 (benchmarks/README.md).
MAP_SCORE_THRESHOLDS: dict[str, float] = {
    "object_enrichment": 1.0,
    "corner_enrichment": 4.8,
    "consensus": 0.82,
    "dead_maps": 0.5,
    # mask-free shortcut probes (lightning_saliency.shortcut_scores)
    "small_cue_reliance": 0.28,
    "stamped_cue_reliance": 0.12,
    "colour_reliance": 0.72,
    "texture_reliance": 0.84,
    # sub-class strategies (lightning_saliency.evaluate.strategies): set by the benchmark's
    # sub-class study (64 samples, Grad-CAM); clean models of small identical shapes reach
    # 0.25, so it is 0.19 where no such objects are (benchmarks/README.md)
    "sub_class_stamped_cue": 0.38,
}
# Scores that alarm only when the user gives a threshold. attended_consensus reads where the
# maps point, not what the model uses: clean controls whose maps rest on an uninformative
# stamped mark score as high as learnt marks. background_reliance: a clean model of faces
# against non-faces keeps 0.70 of its decision with the hottest 30 % of the image blurred away
# (faces fill the frame), as much as a tinted background keeps on digits; the threshold the
# benchmark sets for it (1.1) lies past its range. colour_reliance and texture_reliance read
# the global cues instead.
OPT_IN_ALARMS = frozenset({"attended_consensus", "background_reliance"})
# Map scores about the method's own health, not the model: they raise method notes, never
# alarms (with every score a method measures about its own maps, :func:`is_health`).
HEALTH_SCORES = frozenset({"dead_maps"})
LOW_IS_BAD = frozenset({"object_enrichment"})
# Per-class alarms: only for a score where one class can hide in the mean. A class coded by the
# *absence* of the others' features gets maps that point nowhere, so its object_enrichment is low
# while the other classes keep the mean high. The other scores alarm on the mean only.
PER_CLASS_ALARMS = frozenset({"object_enrichment"})
# Scores that read only where a map points, not what the decision rests on. A method whose
# record says ``location_alarms=False`` logs them and never alarms on them: the attention
# methods' maps also mark where attention rests without mattering (attention sinks in
# background tokens), and on ViTs trained here (benchmarks/README.md, --study vit) they piled
# into clean digits' and faces' corners (transformer_attribution: 26/40 clean runs past the
# corner or consensus threshold, generic_attention 20/40), while the probes, which ask the
# decision, raised none and caught all but 0-3 of the same cues.
LOCATION_SCORES = frozenset(
    {"object_enrichment", "corner_enrichment", "consensus", "attended_consensus"}
)
# Scores of a group of images, not of one (:mod:`.strategies`): every image carries its group's
# value, and the strongest group counts, so they are judged and logged by their largest value.
GROUP_SCORES = frozenset({"sub_class_stamped_cue"})
MAP_SCORE_MEANING: dict[str, str] = {
    "object_enrichment": "attention left the object: the map puts less mass on the labelled "
    "object than an even spread would; the model likely uses background or a planted cue",
    "corner_enrichment": "attention piles up in an image corner: a watermark, logo or patch "
    "shortcut is likely",
    "consensus": "maps of different images agree on one fixed place: objects move, a "
    "shortcut at a fixed location does not",
    "dead_maps": "most maps are zero: the target layer carries no class evidence (dead or "
    "saturated units, or a class coded by the absence of features)",
    "small_cue_reliance": "the decision collapses when the hottest 2 % of the pixels are "
    "blurred away, and not when the pixels around them are: the model reads a small mark "
    "(a watermark, a tag, a logo), not an object",
    "attended_consensus": "the hottest regions of one class hold the same content in every "
    "image: a stamped mark repeats, real objects vary",
    "background_reliance": "the decision survives blurring away the hottest 30 % of the image: "
    "the model reads the context (background, colour, texture), not the object",
    "stamped_cue_reliance": "the decision rests on a small region whose content repeats across "
    "the images of a class: a stamped cue (a watermark, a tag, a patch), not a varied object",
    "colour_reliance": "the decision survives blurring away the whole image: the model reads "
    "colours (a tint, a colour cast), not shapes",
    "texture_reliance": "the decision survives shuffling the image's small tiles, and not a "
    "blur: the model reads a texture, not the object's shape",
    "sub_class_stamped_cue": "a group of images of one class attends to alike content and "
    "loses its decision with it: part of the class carries a stamped cue (a tag, a watermark)",
}


def default_thresholds() -> dict[str, float]:
    """Thresholds of the map scores and of every registered method's own scores.

    Examples:
        >>> default_thresholds()["corner_enrichment"]
        4.8
    """
    merged = dict(MAP_SCORE_THRESHOLDS)
    for method in METHODS.values():
        for score in method.scores:
            if score.threshold is not None:
                merged.setdefault(score.name, score.threshold)
    return merged


def is_health(score: str) -> bool:
    """Whether ``score`` is about a method's own health (a note: dead maps, IG's completeness
    error and every score a method declares about its own maps), not about the model (an
    alarm).

    Examples:
        >>> is_health("ig_completeness_error"), is_health("dead_maps"), is_health("consensus")
        (True, True, False)
    """
    if score in HEALTH_SCORES:
        return True
    return any(declared.name == score for m in METHODS.values() for declared in m.scores)


def meaning(score: str) -> str:
    """What a tripped score means, in a sentence."""
    if score in MAP_SCORE_MEANING:
        return MAP_SCORE_MEANING[score]
    for method in METHODS.values():
        for declared in method.scores:
            if declared.name == score:
                return declared.meaning
    return ""


@dataclass(frozen=True)
class Alarm:
    """A score past its threshold at one logged epoch (for one class, or the mean)."""

    method: str
    score: str
    value: float
    threshold: float
    class_name: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.score)


def merge_thresholds(user: Mapping[str, float] | None) -> dict[str, float]:
    """Defaults overridden by the user's; unknown score names are refused.

    Scores in :data:`OPT_IN_ALARMS` alarm only when given a threshold here.

    Examples:
        >>> merge_thresholds({"consensus": 0.9})["consensus"]
        0.9
        >>> "attended_consensus" in merge_thresholds(None)
        False
        >>> merge_thresholds({"attended_consensus": 0.8})["attended_consensus"]
        0.8
    """
    merged = default_thresholds()
    if user is not None and not isinstance(user, Mapping):
        raise SaliencyConfigError(f"thresholds must be a dict of score -> number, got {user!r}.")
    for name, value in (user or {}).items():
        if name not in merged and name not in OPT_IN_ALARMS:
            raise SaliencyConfigError(
                f"thresholds names {name!r}, a score with no alarm; alarms exist for: "
                f"{', '.join([*merged, *sorted(OPT_IN_ALARMS)])}."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise SaliencyConfigError(f"thresholds[{name!r}] must be a number, got {value!r}.")
        merged[name] = float(value)
    return merged


def tripped(value: float, score: str, threshold: float) -> bool:
    return value < threshold if score in LOW_IS_BAD else value > threshold


def clear_of(value: float, score: str, threshold: float, margin: float) -> bool:
    """Whether ``value`` lies on the safe side of ``threshold`` by ``margin`` (a share of the
    threshold): what a raised alarm needs to count a logged run towards clearing.

    Examples:
        >>> [clear_of(v, "corner_enrichment", 3.8, 0.25) for v in (3.65, 2.8)]
        [False, True]
        >>> [clear_of(v, "object_enrichment", 1.0, 0.25) for v in (1.2, 1.3)]
        [False, True]
    """
    if value != value:  # NaN: no evidence either way
        return False
    if score in LOW_IS_BAD:
        return value >= threshold * (1 + margin)
    return value <= threshold - abs(threshold) * margin


def worst_value(
    score: str, means: Mapping[str, float], per_class: Mapping[str, Mapping[str, float]]
) -> float:
    """The value an alarm on ``score`` is judged by: its mean, or, for the scores in
    :data:`PER_CLASS_ALARMS`, the most alarming of the mean and each class's mean (so that a
    class's alarm clears by that class, not by the average of all of them).

    Examples:
        >>> worst_value("object_enrichment", {"object_enrichment": 2.3},
        ...             {"cat": {"object_enrichment": 0.9}, "dog": {"object_enrichment": 3.0}})
        0.9
    """
    values = [means[score]] if score in means else []
    if score in PER_CLASS_ALARMS:
        values += [v[score] for v in per_class.values() if score in v]
    if not values:
        return float("nan")
    return min(values) if score in LOW_IS_BAD else max(values)


def check(
    method: str,
    means: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]],
    thresholds: Mapping[str, float],
) -> list[Alarm]:
    """Alarms for one method: every score on its mean over samples; the scores in
    :data:`PER_CLASS_ALARMS` also on each class's mean (the worst class is reported).

    Examples:
        >>> thresholds = default_thresholds()
        >>> [a.score for a in check("gradcam", {"corner_enrichment": 6.0}, {}, thresholds)]
        ['corner_enrichment']
        >>> check("gradcam", {}, {"cat": {"object_enrichment": 0.4}}, thresholds)[0].class_name
        'cat'
    """
    alarms = []
    for score, threshold in thresholds.items():
        if score in means and tripped(means[score], score, threshold):
            alarms.append(Alarm(method, score, means[score], threshold))
            continue
        if score not in PER_CLASS_ALARMS:
            continue
        worst: tuple[str, float] | None = None
        for class_name, values in per_class.items():
            if score in values and tripped(values[score], score, threshold):
                value = values[score]
                if worst is None or (value < worst[1] if score in LOW_IS_BAD else value > worst[1]):
                    worst = (class_name, value)
        if worst is not None:
            alarms.append(Alarm(method, score, worst[1], threshold, worst[0]))
    return alarms
