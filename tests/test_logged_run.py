"""One logged run without a Trainer: ``LoggedRun`` takes a run context, a model and the
methods, and hands down to the engine, the scores, the pictures and the loggers."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_model
from lightning.pytorch.loggers import CSVLogger

from lightning_saliency.callback.config import SaliencyConfig
from lightning_saliency.callback.failures import FailurePolicy
from lightning_saliency.callback.logged_run import LoggedRun, RunContext
from lightning_saliency.callback.record import FitRecord
from lightning_saliency.callback.sharing import Sharing
from lightning_saliency.publish.publisher import Publisher

EPOCH_0 = RunContext(epoch=0, step=7, fitting=True, column=("ep 0", 0.0))


def one_run(tmp_path, methods=("gradcam", "integrated_gradients"), **arguments):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = SaliencyConfig.check(
        {"methods": methods, "samples": images, "labels": [0, 1, 2, 3], "ig_steps": 4} | arguments
    )
    record, policy = FitRecord(config), FailurePolicy()
    publisher = Publisher([CSVLogger(str(tmp_path), name="run")])
    run = LoggedRun(record, Sharing(), policy, publisher)
    torch.manual_seed(0)
    model = tiny_model().eval()
    return run, run(EPOCH_0, model, list(config.methods)), record, policy


def test_a_logged_run_explains_scores_draws_and_writes(tmp_path):
    run, outcome, record, policy = one_run(tmp_path, sanity_check=False)
    run.publisher.close()
    assert outcome.ran and not policy.switched_off
    assert sorted(run.explanations.maps) == ["gradcam", "integrated_gradients"]
    assert record.fresh == set(record.held)  # what the hook logs anew
    assert "saliency/gradcam/corner_enrichment" in record.held
    assert "saliency_alarms/count" in record.held
    assert not any(k.startswith("saliency_per_class/") for k in record.held)  # charts only
    assert [h.epoch for h in record.monitor.history] == [0]
    root = tmp_path / "run" / "version_0"
    for tag in ("gradcam", "integrated_gradients", "overview", "timeline"):
        assert (root / "saliency" / tag / "step_000007.png").is_file(), tag
    text = (root / "alarms.txt").read_text()
    assert text.startswith("step 7:\n**epoch 0**") and "raised now:" in text
    assert len(record.timeline) == 1 and record.timeline.labels == ["ep 0"]


def test_the_first_run_of_a_fit_checks_the_maps_once(tmp_path):
    run, _, record, _ = one_run(tmp_path)
    assert record.sanity_checked and run.sanity is not None and run.faithfulness is not None
    assert sorted(run.sanity.methods) == ["gradcam", "integrated_gradients"]
    report = run.sanity
    run(EPOCH_0, tiny_model().eval(), ["gradcam"])
    assert run.sanity is report  # not again in the same fit
    run.publisher.close()


def test_pictures_that_fail_switch_their_method_off_in_the_same_run(tmp_path, monkeypatch, caplog):
    import lightning_saliency.viz.figures as figures

    real = figures.method_tiles

    def broken(method, *args, **kwargs):
        if method == "gradcam":
            raise RuntimeError("no picture")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(figures, "method_tiles", broken)
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        run, outcome, record, policy = one_run(tmp_path, sanity_check=False)
    run.publisher.close()
    assert list(policy.switched_off) == ["gradcam"]
    assert "gradcam failed and is switched off" in caplog.text
    text = (tmp_path / "run" / "version_0" / "alarms.txt").read_text()
    assert "gradcam failed and is switched off" in text and "switched off: gradcam" in text
    assert not (tmp_path / "run" / "version_0" / "saliency" / "gradcam").exists()


def test_a_method_note_is_written_under_method_health_not_among_the_alarms(tmp_path):
    """IG with one step misses its completeness (a note about the method), and the untrained
    model's maps alarm about nothing it was right on: the note goes to the text's method-health
    part and to saliency_health/, never to the alarms or their count."""
    run, outcome, record, _ = one_run(
        tmp_path, methods=("integrated_gradients",), ig_steps=1, sanity_check=False
    )
    run.publisher.close()
    assert ("integrated_gradients", "ig_completeness_error") in record.monitor.noted
    assert all(e.score != "ig_completeness_error" for e in record.monitor.alarms)
    assert record.held["saliency_alarms/count"] == float(len(record.monitor.raised))
    text = (tmp_path / "run" / "version_0" / "alarms.txt").read_text()
    alarms, health = text.split("**method health**")
    assert "ig_completeness_error" not in alarms
    assert "saliency method note at epoch 0: integrated_gradients ig_completeness_error" in health
    assert "noted now: integrated_gradients ig_completeness_error" in health


class OtherRankFailed:
    """The ranks as a method sees them when it failed on another rank only."""

    def __init__(self, failed: set[str], methods: list[str]) -> None:
        self.failed, self.methods = failed, methods

    def any_rank(self, flags):
        return [f or m in self.failed for f, m in zip(flags, self.methods)]


def test_a_method_that_failed_on_another_rank_is_switched_off_here_too():
    policy = FailurePolicy()
    methods = ["gradcam", "dff"]
    policy.failed("dff", RuntimeError("here"))
    policy.agree(OtherRankFailed({"gradcam"}, methods), methods)
    assert sorted(policy.switched_off) == ["dff", "gradcam"]
    assert policy.switched_off["gradcam"] == "RuntimeError('failed on another rank')"
    assert len(policy.news()) == 2 and policy.news() == []


def test_a_failing_step_is_said_once_and_the_run_goes_on(caplog):
    policy = FailurePolicy()
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        for _ in range(3):
            with policy.step("scores", "scoring", "no scores this run"):
                raise ValueError("NaN in the maps")
    assert caplog.text.count("scoring failed (ValueError: NaN in the maps)") == 1
    with pytest.raises(KeyboardInterrupt), policy.step("scores", "scoring", "never"):
        raise KeyboardInterrupt  # not an Exception: a person stopping the run
