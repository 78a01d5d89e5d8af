"""Can the maps be trusted? The callback's once-per-fit sanity check and faithfulness test.

:func:`trust_checks` runs the cascading randomisation test
(:func:`~lightning_saliency.sanity_check`) and the deletion and insertion curves
(:func:`~lightning_saliency.faithfulness`) on the fixed samples and this run's maps, at a
quarter of ``faithfulness()``'s default forwards. Every rank runs it (the same samples and
weights give the same verdict), so a sharded model has every rank in every forward.
:func:`verdict_lines` and :func:`trust_text` are what people read of it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_saliency.callback.config import SaliencyConfig
from lightning_saliency.callback.explainer import Explainer
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.evaluate.deletion import FaithfulnessReport, faithfulness
from lightning_saliency.evaluate.sanity import SanityReport, sanity_check

FAITHFULNESS_STEPS = 8  # the callback's curves: a ninth of the pixels a step, 2 random maps:
FAITHFULNESS_RANDOM_MAPS = 2  # a quarter of faithfulness()'s default forwards, once per fit


def trust_checks(
    explainer: Explainer,
    model: nn.Module,
    samples: FixedSamples,
    out: Explanations,
    methods: list[str],
) -> tuple[SanityReport, FaithfulnessReport]:
    """The sanity check and the faithfulness test of ``methods`` on ``out``, the maps of
    ``samples`` now."""
    config = explainer.config
    report = sanity_check(
        model,
        samples.images,
        config.targets(samples.labels),
        methods,
        explainer.layer,
        noise_seed=config.seed,
        original=out,
        method_options={m: config.method_options[m] for m in methods},
        layout=config.layout,
        reshape=config.reshape,
        output_transform=config.output_transform,
    )
    faith = faithfulness(
        model,
        samples.images,
        {m: out[m] for m in report.methods},
        out.targets,
        steps=FAITHFULNESS_STEPS,
        random_maps=FAITHFULNESS_RANDOM_MAPS,
        signed_mass=config.signed_mass,
        seed=config.seed,
        output_transform=config.output_transform,
    )
    return report, faith


def verdict_lines(report: SanityReport, config: SaliencyConfig) -> list[str]:
    """A line for the alarm text per method that failed the sanity check."""
    consequence = (
        "its pictures and scores stay, its alarms are left out"
        if config.sanity_gate
        else "it still raises alarms (sanity_gate=False)"
    )
    return [
        f"{method} is not model-sensitive: with the network randomised from the head down its "
        f"maps stay at Spearman {report.similarity(method):.2f} of the trained model's (pass: "
        f"< {report.threshold}); {consequence}."
        for method in report.failed
    ]


def trust_record(report: SanityReport, faith: FaithfulnessReport) -> dict[str, Any]:
    """The sanity check and the faithfulness test as plain data, for the loggers that keep
    files (MLflow artifacts, ``sanity.json`` beside CSV logs): per method, the similarity the
    verdict reads at each depth and its mean, the verdict; the deletion and insertion areas,
    and chance's."""
    sanity = {
        m: {
            "similarity": report.similarity(m),
            "by_depth": report.read(m).mean(1).tolist(),
            "abs_spearman": float(report.spearman_abs[m].mean()),
            "ssim": float(report.ssim[m].mean()),
            "passes": report.passed[m],
        }
        for m in report.methods
    }
    faithful = {
        m: {
            "deletion_auc": float(faith.deletion[m].mean()),
            "insertion_auc": float(faith.insertion[m].mean()),
            "beats_random": faith.beats_random(m),
        }
        for m in faith.deletion
    }
    return {
        "sanity": {
            "threshold": report.threshold,
            "layers": [[depth, name] for depth, name in report.layers],
            "methods": sanity,
            "errors": {m: f"{type(e).__name__}: {e}" for m, e in report.errors.items()},
        },
        "faithfulness": {
            "steps": faith.steps,
            "methods": faithful,
            "random": {
                "deletion_auc": float(faith.random_deletion.mean()),
                "insertion_auc": float(faith.random_insertion.mean()),
            },
        },
    }


def trust_text(report: SanityReport, faith: FaithfulnessReport) -> str:
    """The Markdown the loggers show under ``saliency/sanity``."""
    return (
        "**Sanity check** (cascading model-parameter randomisation, Adebayo et al. 2018): "
        "Spearman of each method's maps with the trained model's as the network is randomised "
        "from the head down. Lower is better; a method at or above "
        f"{report.threshold} shows the input more than the model.\n\n"
        + report.table()
        + "\n\n**Faithfulness** (deletion and insertion, Petsiuk et al. 2018)\n\n"
        + faith.table()
    )
