"""A monitor never kills or silently blinds a run (issue 10): each case is a short fit.

Either the mistake is an error before the first training step, naming the argument, or the
run completes and logs what it should. Tiny model, 16-px images, a couple of batches.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
from helpers import read_events, tiny_datamodule, tiny_model, trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler

from lightning_saliency import SaliencyCallback, SaliencyConfigError, SaliencyEarlyStopping
from lightning_saliency.demos import ShortcutDataModule

FAST = dict(methods=("gradcam", "ig"), num_samples=4, ig_steps=4)
SHORT = dict(limit_train_batches=2, limit_val_batches=1, max_epochs=1)


def small_dm(**kwargs: Any) -> ShortcutDataModule:
    defaults = dict(n_train=32, n_val=16, size=16, batch_size=8)
    defaults.update(kwargs)
    return tiny_datamodule(**defaults)


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


def fit(tmp_path, callbacks, model=None, dm=None, **kwargs):
    L.seed_everything(0)
    model = model or tiny_model(width=4)
    options = dict(SHORT)
    options.update(kwargs)
    tr = trainer(str(tmp_path), list(callbacks), **options)
    tr.fit(model, dm or small_dm())
    return tr, model


def samples(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


class UnusedConv(type(tiny_model())):  # type: ignore[misc]
    """A conv layer that forward never calls."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.spare = nn.Conv2d(3, 4, 3)


class NaNAtStart(type(tiny_model())):  # type: ignore[misc]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


class NaNAfterEpoch0(type(tiny_model())):  # type: ignore[misc]
    """Diverges after the first epoch: the outputs of validation become NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.current_epoch >= 1 and not self.training:
            out = out * float("nan")
        return out


def frozen_model(dead: bool = False) -> L.LightningModule:
    """lr=0: the maps and scores never change; ``dead``: a zero head, so every map is zero."""
    model = tiny_model(width=4, lr=0.0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0  # running statistics stay put too
    if dead:
        nn.init.zeros_(model.fc.weight)
    return model


# -- mistakes: an error before the first training step, naming the argument -------------------
@dataclass
class Mistake:
    argument: str  # appears in the message
    callback: Callable[[], dict[str, Any]]
    model: Callable[[], L.LightningModule] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)


MISTAKES = {
    "cadence 0": Mistake(
        "method_every_n_epochs", lambda: {"method_every_n_epochs": {"gradcam": 0}}
    ),
    "cadence of an unused method": Mistake(
        "method_every_n_epochs", lambda: {"method_every_n_epochs": {"dff": 2}}
    ),
    "masks of the wrong size": Mistake(
        "masks", lambda: {"samples": samples(), "masks": torch.ones(4, 8, 8)}
    ),
    "masks of the wrong count": Mistake(
        "masks", lambda: {"samples": samples(), "masks": torch.ones(3, 16, 16)}
    ),
    "masks without samples": Mistake("masks", lambda: {"masks": torch.ones(4, 16, 16)}),
    "mean/std for 2 channels": Mistake("mean", lambda: {"mean": [0.5, 0.5], "std": [0.2, 0.2]}),
    "std of 0": Mistake("std", lambda: {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}),
    "0 samples": Mistake("samples", lambda: {"samples": torch.zeros(0, 3, 16, 16)}),
    "uint8 samples": Mistake(
        "samples", lambda: {"samples": torch.zeros(4, 3, 16, 16, dtype=torch.uint8)}
    ),
    "ig_steps=0": Mistake("ig_steps", lambda: {"ig_steps": 0}),
    "ig_steps='fast'": Mistake("ig_steps", lambda: {"ig_steps": "fast"}),
    "dff_components=0": Mistake(
        "dff_components", lambda: {"methods": ("dff",), "dff_components": 0}
    ),
    "target_layer a Linear": Mistake("target_layer", lambda: {"target_layer": "fc"}),
    "target_layer never called": Mistake(
        "target_layer", lambda: {"target_layer": "spare"}, model=UnusedConv
    ),
    "labels too short": Mistake("labels", lambda: {"samples": samples(), "labels": [0, 1, 2]}),
    "labels out of range": Mistake(
        "labels", lambda: {"samples": samples(), "labels": [0, 1, 2, 9]}
    ),
    "timeline_method not used": Mistake(
        "timeline_method", lambda: {"timeline_method": "occlusion"}
    ),
    "thresholds NaN": Mistake("thresholds", lambda: {"thresholds": {"consensus": float("nan")}}),
    "thresholds unknown": Mistake("thresholds", lambda: {"thresholds": {"consensuss": 0.5}}),
    "NaN outputs at setup": Mistake("not finite", lambda: {}, model=NaNAtStart),
    "bad name": Mistake("name", lambda: {"name": "a/b"}),
    "sign unknown": Mistake("sign", lambda: {"sign": "abs"}),
    "sign of a non-negative method": Mistake(
        "never negative", lambda: {"sign": {"gradcam": "all"}}
    ),
    "sign of an unused method": Mistake("sign", lambda: {"sign": {"smoothgrad": "positive"}}),
}


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_a_mistake_is_an_error_before_training(tmp_path, case):
    mistake = MISTAKES[case]
    counter = StepCounter()
    model = mistake.model() if mistake.model else None
    with pytest.raises(SaliencyConfigError, match=mistake.argument):
        kwargs = {**FAST, **mistake.callback()}
        with_sanity = {"num_sanity_val_steps": 2, **mistake.trainer}  # Lightning's default
        fit(tmp_path, [counter, SaliencyCallback(**kwargs)], model=model, **with_sanity)
    assert counter.steps == 0


def test_two_callbacks_with_one_name_are_refused_by_the_trainer(tmp_path):
    """Lightning refuses two callbacks with one state_key when the Trainer is built; the
    callback's docstring (which that error points to) says to give each a name=."""
    pair = [SaliencyCallback(**FAST), SaliencyCallback(**FAST, target_layer="features.3")]
    with pytest.raises(RuntimeError, match="state_key"):
        trainer(str(tmp_path), pair)
    assert "name=" in SaliencyCallback.__doc__


# -- runs that complete and log what they should -----------------------------------------------
def test_labels_as_a_list_are_used(tmp_path):
    callback = SaliencyCallback(**FAST, samples=samples(), labels=[0, 1, 2, 3])
    fit(tmp_path, [callback])
    assert callback.fixed_samples.labels.tolist() == [0, 1, 2, 3]
    assert set(callback.history[0].per_class["gradcam"]) == {
        "circle",
        "square",
        "triangle",
        "cross",
    }


def test_cadence_counts_validation_runs(tmp_path):
    """check_val_every_n_epoch=2 with every_n_epochs=2: validations 0 and 2 of 3 are logged."""
    callback = SaliencyCallback(**FAST, every_n_epochs=2)
    fit(tmp_path, [callback], max_epochs=6, check_val_every_n_epoch=2)
    assert [h.epoch for h in callback.history] == [1, 5]
    assert len(read_events(str(tmp_path)).Images("saliency/gradcam")) == 2


@pytest.mark.parametrize("every, logged", [(1, 4), (2, 2)])
def test_several_validations_per_epoch_each_count(tmp_path, every, logged):
    """val_check_interval=0.5: two validation runs per epoch, each one counts."""
    callback = SaliencyCallback(**FAST, every_n_epochs=every)
    fit(tmp_path, [callback], max_epochs=2, limit_train_batches=4, val_check_interval=0.5)
    assert len(callback.history) == logged
    expected = ["ep 0 50%", "ep 0", "ep 1 50%", "ep 1"][:: 4 // logged]
    assert callback.timeline.labels == expected


def layer_breaks_after_epoch_0(monkeypatch) -> None:
    """The target layer breaks mid-run: after the dry run and epoch 0, choosing it raises."""
    engine = importlib.import_module("lightning_saliency.engine.explanations")
    real, calls = engine.choose_layer, {"n": 0}

    def breaks_after_epoch_0(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the dry run and epoch 0
            raise RuntimeError("the layer is gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "choose_layer", breaks_after_epoch_0)


def test_one_failing_layer_leaves_the_other_methods_on(tmp_path, monkeypatch, caplog):
    """A target layer that breaks mid-run switches off the layer methods only; said once on
    the logger and shown in TensorBoard."""
    layer_breaks_after_epoch_0(monkeypatch)
    callback = SaliencyCallback(**FAST)
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        fit(tmp_path, [callback], max_epochs=3)
    assert set(callback.switched_off) == {"gradcam"}
    said = [r for r in caplog.records if "switched off" in r.getMessage()]
    assert len(said) == 1 and "gradcam" in said[0].getMessage()
    assert "\n" not in said[0].getMessage() and ".py" not in said[0].getMessage()
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/integrated_gradients")) == 3
    assert len(events.Images("saliency/gradcam")) == 1
    assert "saliency_health/switched_off/gradcam" in events.Tags()["scalars"]  # not an alarm
    assert any(
        "gradcam failed" in str(t) for t in events.Tensors("saliency_alarms/alarms/text_summary")
    )


def test_a_method_whose_scoring_fails_is_the_only_one_switched_off(tmp_path):
    """A method that starts reporting a score of the wrong length after epoch 0 fails its own
    scoring; the other methods are scored and logged."""
    from dataclasses import replace

    from lightning_saliency.engine.methods import METHODS, MethodScore, register, unregister

    gradcam, calls = METHODS["gradcam"], {"n": 0}

    def compute(session, options):
        calls["n"] += 1  # the dry run and epoch 0 report one value per image
        n = session.images.shape[0] - (calls["n"] > 2)
        session.extras["lopsided"] = torch.ones(n)
        return gradcam.compute(session, options)

    register(
        replace(gradcam, name="lopsided", compute=compute, scores=(MethodScore("lopsided", "x"),))
    )
    try:
        callback = SaliencyCallback(methods=("gradcam", "lopsided"), num_samples=4)
        tr, _ = fit(tmp_path, [callback], max_epochs=2)
    finally:
        unregister("lopsided")
    assert set(callback.switched_off) == {"lopsided"}
    assert [sorted(h.means) for h in callback.history] == [["gradcam", "lopsided"], ["gradcam"]]


def test_nan_outputs_mid_run_warn_once_and_draw_nothing(tmp_path, caplog):
    callback = SaliencyCallback(**FAST)
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        fit(tmp_path, [callback], model=NaNAfterEpoch0(width=4), max_epochs=3)
    assert caplog.text.count("not finite") == 1
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 1  # epoch 0 only; no zero maps or "nan%"
    assert "saliency_alarms/nonfinite_outputs" in events.Tags()["scalars"]
    assert not callback.switched_off


# -- the samples: what the val loader actually yields -------------------------------------------
class SubsetValModule(ShortcutDataModule):
    """k-fold style: one dataset, a SubsetRandomSampler per split."""

    val_indices = list(range(24, 32))

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_set = self.train_set

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8, sampler=SubsetRandomSampler(range(24)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=8, sampler=SubsetRandomSampler(self.val_indices))


def test_samples_come_from_the_val_sampler(tmp_path):
    """A random sampler has no fixed order: the samples are the first rows validation ran
    (kept, and said), all of them from the sampler's subset."""
    callback = SaliencyCallback(**FAST)
    dm = SubsetValModule(n_train=32, n_val=8, size=16, batch_size=8)
    fit(tmp_path, [callback], dm=dm)
    assert callback.fixed_samples.indices is None
    subset = torch.stack([dm.val_set[i]["image"] for i in SubsetValModule.val_indices])
    for image in callback.fixed_samples.images:
        assert bool((subset == image).flatten(1).all(dim=1).any())


# -- state: a new fit, a resume, validate() after fit -------------------------------------------
def test_a_second_fit_starts_fresh(tmp_path):
    callback = SaliencyCallback(**FAST)
    fit(tmp_path / "a", [callback], max_epochs=2, dm=small_dm(seed=0))
    first = callback.fixed_samples.images.clone()
    fit(tmp_path / "b", [callback], max_epochs=1, dm=small_dm(seed=7))
    assert not torch.equal(first, callback.fixed_samples.images)
    assert [h.epoch for h in callback.history] == [0]
    assert callback.timeline.labels == ["ep 0"]


def test_resume_with_other_methods_keeps_what_applies(tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SaliencyCallback(methods=("gradcam", "ig"), num_samples=4, ig_steps=4)
    fit(tmp_path / "a", [first, checkpoint], max_epochs=2, enable_checkpointing=True)
    resumed = SaliencyCallback(methods=("gradcam", "dff"), num_samples=4)
    L.seed_everything(0)
    tr = trainer(str(tmp_path / "b"), [resumed], **{**SHORT, "max_epochs": 3})
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        tr.fit(tiny_model(width=4), small_dm(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert "dropped" in caplog.text and "integrated_gradients" in caplog.text
    assert torch.equal(resumed.fixed_samples.images, first.fixed_samples.images)
    assert [h.epoch for h in resumed.history] == [0, 1, 2]
    assert torch.equal(resumed.monitor.references["gradcam"], first.monitor.references["gradcam"])
    assert "integrated_gradients" not in resumed.monitor.references


def test_validate_after_fit_explains_the_same_samples_and_keeps_references(tmp_path):
    callback = SaliencyCallback(**FAST)
    tr, model = fit(tmp_path, [callback], max_epochs=2)
    images = callback.fixed_samples.images.clone()
    references = {k: v.clone() for k, v in callback.monitor.references.items()}
    tr.validate(model, small_dm())
    assert torch.equal(callback.fixed_samples.images, images)
    assert len(callback.history) == 3
    for method, reference in references.items():
        assert torch.equal(callback.monitor.references[method], reference)


def test_a_legacy_state_key_still_loads(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SaliencyCallback(**FAST)
    fit(tmp_path / "a", [first, checkpoint], max_epochs=1, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    state = saved["callbacks"].pop("SaliencyCallback")
    saved["callbacks"][
        "SaliencyCallback{'methods': ('gradcam', 'integrated_gradients'), 'seed': 0}"
    ] = state
    torch.save(saved, path)
    resumed = SaliencyCallback(**FAST)
    L.seed_everything(0)
    tr = trainer(str(tmp_path / "b"), [resumed], **{**SHORT, "max_epochs": 2})
    tr.fit(tiny_model(width=4), small_dm(), ckpt_path=str(path))
    assert torch.equal(resumed.fixed_samples.images, first.fixed_samples.images)
    assert [h.epoch for h in resumed.history] == [0, 1]


def test_the_timeline_keeps_the_early_epochs():
    from lightning_saliency.viz.figures import Timeline

    timeline = Timeline()
    for epoch in range(70):
        timeline.add(torch.rand(2, 3, 8, 8), epoch)
    epochs = [int(label.split()[-1]) for label in timeline.labels]
    assert epochs[0] == 0 and epochs[-1] == 69 and len(epochs) == 32
    assert sum(1 <= e <= 23 for e in epochs) >= 9  # about a third of the columns
    assert max(b - a for a, b in zip(epochs, epochs[1:])) <= 4


# -- Lightning contracts ---------------------------------------------------------------------
def test_early_stopping_on_dead_maps_does_not_kill_the_run(tmp_path):
    callback = SaliencyCallback(**FAST)
    stop = SaliencyEarlyStopping(monitor="saliency/gradcam/corner_enrichment", patience=5)
    tr, _ = fit(tmp_path, [callback, stop], model=frozen_model(dead=True), max_epochs=2)
    assert tr.current_epoch == 2
    value = float(tr.callback_metrics["saliency/gradcam/corner_enrichment"])
    assert math.isfinite(value) and callback.history[0].means["gradcam"].get("dead_maps") == 1.0


def test_early_stopping_patience_counts_logged_epochs(tmp_path):
    """every_n_epochs=2, patience=2, a score that never improves: logged at epochs 0, 2, 4;
    the run stops after the second logged epoch without improvement (epoch 4)."""
    seen = []

    class Watch(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["saliency/gradcam/consensus"]))

    callback = SaliencyCallback(**FAST, every_n_epochs=2)
    stop = SaliencyEarlyStopping(monitor="saliency/gradcam/consensus", patience=2, mode="min")
    tr, _ = fit(tmp_path, [callback, stop, Watch()], model=frozen_model(), max_epochs=10)
    assert [h.epoch for h in callback.history] == [0, 2, 4]
    assert tr.current_epoch == 5 and stop.stopped_epoch == 4
    assert len(seen) == 5 and all(math.isfinite(v) for v in seen)  # present at every validation
    assert [callback.logged_anew("saliency/gradcam/consensus"), callback.logged_anew("x")] == [
        True,  # logged anew at the last validation (epoch 4)
        None,  # not one of the callback's keys
    ]


@pytest.mark.parametrize(
    "key", ["saliency/gradcam/consensus", "saliency_alarms/count", "saliency/deep/gradcam/x"]
)
def test_a_plain_early_stopping_on_a_saliency_key_is_refused_naming_the_fix(tmp_path, key):
    """It would count the runs where the key's last value is held against its patience."""
    stop = EarlyStopping(monitor=key, patience=2)
    with pytest.raises(SaliencyConfigError, match="SaliencyEarlyStopping") as caught:
        fit(tmp_path, [SaliencyCallback(**FAST), stop])
    assert repr(key) in str(caught.value)
    other = EarlyStopping(monitor="val_loss/dataloader_idx_0", patience=2)  # not a saliency key
    tr, _ = fit(tmp_path, [SaliencyCallback(**FAST), other], max_epochs=2)
    assert tr.current_epoch == 2


def test_early_stopping_on_a_method_switched_off_mid_run_does_not_stop_the_run(
    tmp_path, monkeypatch
):
    """Grad-CAM's layer breaks after epoch 0: its key keeps its last value from then on. With
    patience 1, a plain EarlyStopping would stop at epoch 1 on that held value; the run goes
    on to max_epochs."""
    layer_breaks_after_epoch_0(monkeypatch)
    callback = SaliencyCallback(**FAST)
    stop = SaliencyEarlyStopping(monitor="saliency/gradcam/consensus", patience=1, mode="min")
    tr, _ = fit(tmp_path, [callback, stop], model=frozen_model(), max_epochs=4)
    assert set(callback.switched_off) == {"gradcam"}
    assert tr.current_epoch == 4 and stop.stopped_epoch == 0 and stop.wait_count == 0
    assert callback.logged_anew("saliency/gradcam/consensus") is False  # held, not logged anew


def test_model_checkpoint_on_a_saliency_key_saves_at_logged_epochs(tmp_path):
    callback = SaliencyCallback(**FAST, every_n_epochs=2)
    best = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="saliency/gradcam/corner_enrichment",
        mode="max",
        filename="{epoch}",
    )
    fit(
        tmp_path,
        [callback, best],
        model=frozen_model(dead=True),
        max_epochs=4,
        enable_checkpointing=True,
    )
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0.ckpt"]


def test_test_and_predict_without_a_logger_are_not_refused(tmp_path):
    class Tested(type(tiny_model())):  # type: ignore[misc]
        def test_step(self, batch, batch_idx):
            return None

    callback = SaliencyCallback(**FAST)
    model = Tested(width=4)
    tr = trainer(None, [callback], logger=False)
    loader = DataLoader(torch.rand(16, 3, 16, 16), batch_size=8)
    assert len(tr.predict(model, loader)) == 2
    tr.test(model, loader)
    assert callback.fixed_samples is None


def test_two_named_callbacks_log_side_by_side(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    deep = SaliencyCallback(**FAST, name="deep")
    early = SaliencyCallback(**FAST, name="early", target_layer="features.2")
    fit(tmp_path, [deep, early, checkpoint], enable_checkpointing=True)
    tags = set(read_events(str(tmp_path)).Tags()["images"])
    assert {"saliency/deep/gradcam", "saliency/early/gradcam"} <= tags
    assert deep.layer_name != early.layer_name
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert {deep.state_key, early.state_key} <= set(states)
