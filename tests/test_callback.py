"""SaliencyCallback in a real Trainer: what reaches TensorBoard, and that training is unchanged."""

import gc
import io
import logging
import pickle
import warnings
from dataclasses import replace

import lightning as L
import pytest
import torch
from helpers import (
    hook_count,
    read_events,
    tiny_datamodule,
    tiny_model,
    trainer,
    writer_threads,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.data import default_collate

from lightning_saliency import DEFAULT_METHODS, SaliencyCallback, SaliencyConfigError
from lightning_saliency.callback.samples import split_batch
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.viz import render


def _fit(tmp_path, callbacks, seed=0, model=None, dm=None, **kwargs):
    L.seed_everything(seed)
    model = model or tiny_model()
    dm = dm or tiny_datamodule()
    tr = trainer(str(tmp_path), callbacks, **kwargs)
    tr.fit(model, dm)
    return tr, model


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One 3-epoch run with the default methods, shared by the read-back tests."""
    log_dir = tmp_path_factory.mktemp("tb")
    callback = SaliencyCallback(num_samples=6, ig_steps=8)
    tr, _ = _fit(log_dir, [callback], max_epochs=3)
    return log_dir, tr, callback


def test_tensorboard_receives_grids_overview_and_scalars(logged_run):
    log_dir, tr, callback = logged_run
    events = read_events(str(log_dir))
    tags = set(events.Tags()["images"])
    expected = {f"saliency/{m}" for m in DEFAULT_METHODS} | {
        "saliency/overview",
        "saliency/timeline",
    }
    assert expected <= tags
    val_steps = [e.step for e in events.Scalars("val_acc/dataloader_idx_0")]
    for method in DEFAULT_METHODS:
        images = events.Images(f"saliency/{method}")
        assert [e.step for e in images] == val_steps  # at the step of the val metrics
        picture = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert picture.size == (images[-1].width, images[-1].height)
        assert picture.mode == "RGB" and picture.width > 3 * 96
    timeline = events.Images("saliency/timeline")  # every logged run, at the same steps
    assert [e.step for e in timeline] == val_steps
    assert timeline[0].width < timeline[-1].width  # a column more each run
    overview = events.Images("saliency/overview")[-1]
    assert overview.height > 6 * 96 and overview.width > 5 * 96  # a row per sample (32 px x 3)
    scalar_tags = set(events.Tags()["scalars"])
    for name in (
        "object_enrichment",
        "corner_enrichment",
        "consensus",
        "drift_prev",
        "drift_first",
        "pointing_game",
        "rank_accuracy",
        "dead_maps",
        "small_cue_reliance",
        "attended_consensus",
        "stamped_cue_reliance",
        "background_reliance",
        "colour_reliance",
        "texture_reliance",
    ):
        assert f"saliency/gradcam/{name}" in scalar_tags, name
    assert "saliency/integrated_gradients/ig_completeness_error" in scalar_tags
    assert any(t.startswith("saliency_per_class/gradcam/object_enrichment/") for t in scalar_tags)
    drift = events.Scalars("saliency/gradcam/drift_first")
    assert len(drift) == 3  # from the first logged epoch on, where it compares with itself
    assert drift[0].value == pytest.approx(1.0, abs=1e-4)
    assert "saliency_alarms/count" in tr.callback_metrics
    # what a rule may watch goes through self.log; each alarm's state and the per-class
    # means go to the charts only (self.log costs about a millisecond a key)
    assert "saliency/gradcam/corner_enrichment" in tr.callback_metrics
    assert "saliency_alarms/gradcam/corner_enrichment" in scalar_tags
    assert "saliency_alarms/gradcam/corner_enrichment" not in tr.callback_metrics
    assert not any(k.startswith("saliency_per_class/") for k in tr.callback_metrics)


def test_no_writer_thread_outlives_the_fit(logged_run):
    assert not writer_threads()


def test_event_file_bytes_per_epoch_stay_small(logged_run):
    import glob
    import os

    log_dir, _, _ = logged_run
    size = sum(os.path.getsize(p) for p in glob.glob(f"{log_dir}/**/events*", recursive=True))
    per_epoch = size / 3
    print(f"event-file bytes per logged epoch: {per_epoch:.0f}")
    assert per_epoch < 1_500_000


def test_timeline_png_is_saved_beside_the_logs(logged_run):
    _, _, callback = logged_run
    picture = Image.open(callback.timeline_path)
    assert picture.width > 3 * 64  # three epochs side by side


def test_captions_show_label_prediction_and_confidence(logged_run):
    log_dir, _, callback = logged_run
    events = read_events(str(log_dir))
    text = events.Tensors("saliency/captions/text_summary")[-1].tensor_proto.string_val[0]
    captions = text.decode().split("  \n")
    assert len(captions) == len(callback.fixed_samples) == 6
    assert all(">" in c and "%" in c and c.split()[-1] in ("ok", "X") for c in captions)
    assert captions[0].split(">")[0] in callback.class_names


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "64-true"])
def test_precisions_give_finite_float32_pictures(tmp_path, precision):
    callback = SaliencyCallback(num_samples=4, ig_steps=8)
    _fit(tmp_path, [callback], max_epochs=1, precision=precision)
    events = read_events(str(tmp_path))
    assert "saliency/gradcam" in events.Tags()["images"]
    scores = callback.history[-1].means["gradcam"]
    assert scores and all(value == value for value in scores.values())  # finite, not NaN
    assert callback.monitor.references["gradcam"].dtype == torch.float32


class InferenceBatchModel(type(tiny_model())):
    """Arithmetic after transfer: under validate() the batch becomes inference tensors."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch["image"] = batch["image"] * 1.0
        return batch


def test_validate_under_inference_mode(tmp_path):
    callback = SaliencyCallback(num_samples=4, ig_steps=8)
    model = InferenceBatchModel(width=8)
    tr = trainer(str(tmp_path), [callback])
    with torch.inference_mode():
        probe = torch.ones(1) * 1.0
    assert probe.is_inference()
    tr.validate(model, tiny_datamodule())
    assert callback.fixed_samples.images.is_inference()
    events = read_events(str(tmp_path))
    assert {f"saliency/{m}" for m in DEFAULT_METHODS} <= set(events.Tags()["images"])


def test_samples_fixed_by_own_generator_and_spread_over_classes(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dm = tiny_datamodule()
    a = SaliencyCallback(num_samples=8, seed=5, methods=("gradcam",))
    _fit(tmp_path / "a", [a], seed=1, dm=dm, max_epochs=1)
    b = SaliencyCallback(num_samples=8, seed=5, methods=("gradcam",))
    _fit(tmp_path / "b", [b], seed=2, dm=tiny_datamodule(), max_epochs=1)
    assert a.fixed_samples.indices == b.fixed_samples.indices  # the global seed does not matter
    labels = a.fixed_samples.labels.tolist()
    assert sorted(set(labels)) == [0, 1, 2, 3] and max(labels.count(c) for c in set(labels)) == 2
    assert a.fixed_samples.masks is not None
    del before


def test_every_n_epochs_and_method_cadence(tmp_path):
    callback = SaliencyCallback(
        num_samples=4, ig_steps=8, every_n_epochs=2, method_every_n_epochs={"ig": 4}
    )
    _fit(tmp_path, [callback], max_epochs=5)
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 3  # epochs 0, 2, 4
    assert len(events.Images("saliency/integrated_gradients")) == 2  # epochs 0, 4


def test_explicit_samples_with_masks(tmp_path):
    from lightning_saliency.demos import make_shortcut_images

    data = make_shortcut_images(5, size=32, shortcut_p=1.0, seed=9)
    callback = SaliencyCallback(
        samples=data["images"], labels=data["labels"], masks=data["masks"], methods=("gradcam",)
    )
    _fit(tmp_path, [callback], max_epochs=1)
    assert torch.equal(callback.fixed_samples.images, data["images"])
    assert "saliency/gradcam/object_enrichment" in read_events(str(tmp_path)).Tags()["scalars"]


def test_state_dict_resume_keeps_samples_and_references(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = SaliencyCallback(num_samples=4, ig_steps=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", [callback, ckpt], max_epochs=2, enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"][callback.state_key]
    assert torch.equal(state["samples"]["images"], callback.fixed_samples.images.cpu())

    resumed = SaliencyCallback(num_samples=4, ig_steps=8)
    L.seed_everything(0)
    tr = trainer(
        str(tmp_path / "b"),
        [resumed, ModelCheckpoint(dirpath=tmp_path / "c")],
        max_epochs=3,
        enable_checkpointing=True,
    )
    data = tiny_datamodule(seed=7)  # other images at the same indices
    tr.fit(tiny_model(), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    indices = callback.fixed_samples.indices
    assert resumed.fixed_samples.indices == indices  # the same samples, re-read from the data
    val = data.val_dataloader()[0].dataset
    reread = split_batch(default_collate([val[i] for i in indices]))[0]
    assert torch.equal(resumed.fixed_samples.images, reread)
    first = resumed.monitor.references["gradcam"]
    assert torch.equal(first, callback.monitor.references["gradcam"])
    assert len(resumed.timeline) == 3
    assert [h.epoch for h in resumed.history] == [0, 1, 2]  # the record continues
    assert pickle.loads(pickle.dumps(resumed)).methods == resumed.methods


def test_failure_mid_run_warns_once_and_skips_the_method(tmp_path, monkeypatch, caplog):
    calls = {"n": 0}
    original = METHODS["integrated_gradients"].compute

    def flaky(session, options):
        calls["n"] += 1
        if calls["n"] >= 3:  # the setup dry run and epoch 0 succeed
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(session, options)

    monkeypatch.setitem(
        METHODS, "integrated_gradients", replace(METHODS["integrated_gradients"], compute=flaky)
    )
    callback = SaliencyCallback(num_samples=4, ig_steps=8, sanity_check=False)  # counts calls
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        _fit(tmp_path, [callback], max_epochs=4)
    said = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(said) == 1 and "integrated_gradients failed" in said[0]
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/integrated_gradients")) == 1
    assert len(events.Images("saliency/gradcam")) == 4
    assert calls["n"] == 3
    assert set(callback.switched_off) == {"integrated_gradients"}


def test_failure_of_the_whole_pass_warns_once(tmp_path, monkeypatch, caplog):
    import importlib

    module = importlib.import_module("lightning_saliency.callback.explainer")

    def broken(*args, **kwargs):
        raise RuntimeError("device lost (simulated)")

    monkeypatch.setattr(module, "explain", broken)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        tr, _ = _fit(tmp_path, [callback], max_epochs=3)
    said = [r.getMessage() for r in caplog.records if "device lost" in r.getMessage()]
    assert len(said) == 1 and "gradcam failed" in said[0]
    assert tr.current_epoch == 3  # the run went on


def test_memory_flat_over_30_logged_epochs(tmp_path):
    counts = {}

    class Count(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch in (9, 29):
                callback.flush()  # pictures still queued for the loggers are not a leak
                render.clear_text_cache()  # caption bitmaps: an LRU of bounded size
                gc.collect()
                counts[trainer.current_epoch] = sum(
                    t.numel()
                    for t in gc.get_objects()
                    if isinstance(t, torch.Tensor)
                    and not isinstance(t, torch.nn.Parameter)
                    and t.device.type == "cpu"
                    and t.dtype != torch.float64
                )

    callback = SaliencyCallback(num_samples=4, ig_steps=8)
    dm = tiny_datamodule(n_train=16, n_val=8, batch_size=16)
    tr, model = _fit(
        tmp_path, [callback, Count()], max_epochs=30, dm=dm, logger=CSVLogger(tmp_path)
    )
    growth = counts[29] - counts[9]
    # 20 more columns of the (capped) timeline: 4 uint8 tiles of 3x64x64 each, nothing else
    assert growth == 20 * 4 * 3 * 64 * 64, counts
    assert hook_count(model) == 0


class NoValModel(type(tiny_model())):
    validation_step = L.LightningModule.validation_step


@pytest.mark.parametrize("case", ["limit_val_batches=0", "no validation_step"])
def test_without_validation_explains_at_train_epoch_end(tmp_path, case, caplog):
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    model = NoValModel(width=8) if case == "no validation_step" else tiny_model()
    kwargs = {"limit_val_batches": 0} if case.startswith("limit") else {}
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        _fit(tmp_path, [callback], model=model, max_epochs=2, **kwargs)
    assert "end of training epochs" in caplog.text
    assert len(read_events(str(tmp_path)).Images("saliency/gradcam")) == 2


def test_fast_dev_run_is_skipped_quietly(tmp_path):
    callback = SaliencyCallback(num_samples=4)
    _fit(tmp_path, [callback], fast_dev_run=True)
    assert callback.fixed_samples is None


def test_second_val_dataloader_by_index(tmp_path):
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",), dataloader_idx=1)
    dm = tiny_datamodule()
    _fit(tmp_path, [callback], dm=dm, max_epochs=1)
    broken = dm.broken_set
    expected = torch.stack([broken[i]["image"] for i in callback.fixed_samples.indices])
    assert torch.allclose(callback.fixed_samples.images, expected)


def test_fewer_images_than_asked_warns(tmp_path, caplog):
    callback = SaliencyCallback(num_samples=8, methods=("gradcam",))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        _fit(tmp_path, [callback], dm=tiny_datamodule(n_val=5), max_epochs=1)
    assert "only 5 images" in caplog.text
    assert len(callback.fixed_samples) == 5


def test_iterable_val_set_takes_the_first_images(tmp_path):
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    dm = tiny_datamodule()
    dm.setup()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(len(dm.val_set)):
                item = dm.val_set[i]
                yield item["image"], item["label"]

    class StreamModel(type(tiny_model())):
        def val_dataloader(self):
            return torch.utils.data.DataLoader(Stream(), batch_size=3)

        def train_dataloader(self):
            return dm.train_dataloader()

    L.seed_everything(0)
    tr = trainer(str(tmp_path), [callback], max_epochs=1)
    tr.fit(StreamModel(width=8))
    expected = torch.stack([dm.val_set[i]["image"] for i in range(4)])
    assert torch.equal(callback.fixed_samples.images, expected)
    assert callback.fixed_samples.indices is None


def test_csv_logger_gets_png_files(tmp_path):
    callback = SaliencyCallback(num_samples=4, methods=("gradcam", "dff"))
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, [callback], max_epochs=2, logger=logger)
    pngs = sorted((tmp_path / "lightning_logs" / "version_0" / "saliency").rglob("*.png"))
    names = {p.parent.name for p in pngs}
    assert {"gradcam", "dff", "overview"} <= names
    assert len([p for p in pngs if p.parent.name == "gradcam"]) == 2
    Image.open(pngs[0]).verify()


# -- bad input: a clear error before any training step -----------------------------------------
class TokenModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))

    def training_step(self, batch, _):
        return self(batch[0]).sum()

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self):
        data = torch.utils.data.TensorDataset(torch.randint(10, (8, 5)), torch.zeros(8).long())
        return torch.utils.data.DataLoader(data, batch_size=4)

    train_dataloader = val_dataloader = _loader


def test_non_image_input_fails_at_setup(tmp_path):
    model = TokenModel()
    before = model.fc.weight.detach().clone()
    with pytest.raises(SaliencyConfigError, match="float image tensor"):
        trainer(str(tmp_path), [SaliencyCallback()], num_sanity_val_steps=2).fit(model)
    assert torch.equal(model.fc.weight, before)  # no training step ran


def test_unknown_layer_fails_at_setup_with_close_matches(tmp_path):
    with pytest.raises(SaliencyConfigError, match="Closest names: features"):
        _fit(tmp_path, [SaliencyCallback(target_layer="featurs")])


def test_no_logger_fails_at_setup(tmp_path):
    with pytest.raises(SaliencyConfigError, match="needs a logger"):
        _fit(None, [SaliencyCallback()], logger=False)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(SaliencyConfigError, match="known methods"):
        SaliencyCallback(methods=("gradcam", "lime"))
    with pytest.raises(SaliencyConfigError, match="num_samples"):
        SaliencyCallback(num_samples=0)
    with pytest.raises(SaliencyConfigError, match="target must be"):
        SaliencyCallback(target="random")
    with pytest.raises(SaliencyConfigError, match="a score with no alarm"):
        SaliencyCallback(thresholds={"objekt": 1.0})


@pytest.mark.parametrize(
    ("strategy", "message"),
    [("FSDPStrategy", "FSDP1.*fully_shard"), ("DeepSpeedStrategy", "DeepSpeed.*fully_shard")],
)
def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2(tmp_path, strategy, message):
    callback = SaliencyCallback()

    class FakeTrainer:
        fast_dev_run = False
        loggers = [TensorBoardLogger(str(tmp_path))]
        callbacks = [callback]

    FakeTrainer.strategy = type(strategy, (), {})()
    with pytest.raises(SaliencyConfigError, match=message):
        callback.setup(FakeTrainer(), tiny_model(), "fit")


def test_target_class_out_of_range(tmp_path):
    with pytest.raises(SaliencyConfigError, match="model has 4 classes"):
        _fit(tmp_path, [SaliencyCallback(target=7)])


def test_no_warnings_beyond_alarms_in_a_clean_run(tmp_path):
    callback = SaliencyCallback(num_samples=4, ig_steps=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, [callback], max_epochs=1, dm=tiny_datamodule(shortcut=False))
    ours = [w for w in record if "lightning_saliency" in w.filename or "Saliency" in str(w.message)]
    assert not [w for w in ours if "alarm" not in str(w.message)], [str(w.message) for w in ours]


def test_a_checkpoint_of_0_1_0_still_loads():
    """The state layout of 0.1.0: flat reference maps, alarms raised, the timeline as a list."""
    images = torch.rand(4, 3, 16, 16)
    old = {
        "samples": {"images": images, "labels": torch.arange(4), "masks": None, "indices": None},
        "layer_name": "features",
        "first": {"gradcam": torch.rand(4, 16, 16)},
        "prev": {"gradcam": torch.rand(4, 16, 16)},
        "alarmed": [["gradcam", "consensus"]],
        "timeline": [torch.zeros(4, 3, 64, 64, dtype=torch.uint8)] * 2,
        "timeline_labels": ["ep 0", "ep 1"],
        "ig_steps_start": 16,
    }
    callback = SaliencyCallback(methods=("gradcam",))
    callback.load_state_dict(old)
    assert torch.equal(callback.fixed_samples.images, images)
    assert callback.layer_name == "features" and len(callback.timeline) == 2
    assert torch.equal(callback.monitor.references["gradcam"], old["first"]["gradcam"])


def test_the_config_knows_every_argument_of_the_signature_with_its_default():
    """LightningCLI reads the callback's signature; the config checks the same names, and
    fills what is left out with the same defaults."""
    import inspect

    from lightning_saliency.callback.config import ARGUMENTS

    signature = inspect.signature(SaliencyCallback.__init__).parameters.values()
    assert {p.name: p.default for p in signature if p.name != "self"} == ARGUMENTS
