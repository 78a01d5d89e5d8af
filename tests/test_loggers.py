"""Every logger gets the pictures, scores and alarms in its own idiom, read back from the real
stores as a person would see them: MLflow on a SQLite store, W&B offline, CSV files,
TensorBoard's event files. No fakes: each library runs for real, without a server or account."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from helpers import tiny_datamodule, tiny_model, trainer
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from PIL import Image

from lightning_saliency import SaliencyCallback
from lightning_saliency.publish.sinks import FileSink, MLFlowSink, WandbSink, sink_for


@pytest.fixture(scope="module")
def real_loggers(tmp_path_factory):
    """One fit of 2 epochs with the real loggers: MLflow on a SQLite store, W&B offline, CSV.
    ``corner_enrichment`` alarms at any value (threshold 0), so every logged run has news. W&B
    sends nothing offline: its alerts are seen through the call on the real run."""
    import wandb

    root = tmp_path_factory.mktemp("real_loggers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),  # artifacts staged offline
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mlflow = MLFlowLogger(
            experiment_name="saliency",
            tracking_uri=f"sqlite:///{root}/mlflow.db",
            artifact_location=(root / "mlartifacts").as_uri(),
        )
        w_and_b = WandbLogger(project="saliency", save_dir=str(root), offline=True)
        alerts = []
        w_and_b.experiment.alert = lambda **kwargs: alerts.append(kwargs)
        csv = CSVLogger(str(root), name="csv")
        callback = SaliencyCallback(
            num_samples=4, methods=("gradcam", "dff"), thresholds={"corner_enrichment": 0.0}
        )
        L.seed_everything(0)
        fit = trainer(None, [callback], logger=[w_and_b, mlflow, csv], max_epochs=2)
        fit.fit(tiny_model(), tiny_datamodule(n_train=256))  # right on the samples: judged
        wandb.finish()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return SimpleNamespace(
        root=root, mlflow=mlflow, csv=Path(csv.log_dir), alerts=alerts, callback=callback
    )


def test_dispatch_by_logger_type(tmp_path):
    mlflow = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert isinstance(sink_for(WandbLogger(offline=True, save_dir=str(tmp_path))), WandbSink)
    assert isinstance(sink_for(mlflow), MLFlowSink)
    assert sink_for(DummyLogger()) is None
    assert isinstance(sink_for(CSVLogger(str(tmp_path))), FileSink)


def test_mlflow_stores_every_grid_score_alarm_and_the_trust_reports(real_loggers):
    """Read back through MLflow's own client, from its SQLite store and artifact folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{real_loggers.root}/mlflow.db")
    run_id = real_loggers.mlflow.run_id
    history = client.get_metric_history(run_id, "saliency/gradcam/corner_enrichment")
    assert len(history) == 2 and len({m.step for m in history}) == 2
    files = []

    def walk(path=None):
        for item in client.list_artifacts(run_id, path):
            (walk(item.path) if item.is_dir else files.append(item.path))

    walk()
    grids = [f for f in files if f.startswith("images/saliency_gradcam+") and f.endswith(".png")]
    assert len(grids) == 2  # one per logged run, at its step
    local = client.download_artifacts(run_id, grids[0], str(real_loggers.root / "download"))
    picture = Image.open(local)
    assert picture.mode == "RGB" and picture.size[0] > 100
    assert sum(f.startswith("saliency_alarms/alarms/") for f in files) == 2
    text = Path(client.download_artifacts(run_id, "saliency_alarms/alarms", str(real_loggers.root)))
    assert all("corner_enrichment" in t.read_text() for t in text.glob("*.txt"))
    (report,) = [f for f in files if f.startswith("saliency/sanity/") and f.endswith(".json")]
    data = json.loads(
        Path(client.download_artifacts(run_id, report, str(real_loggers.root))).read_text()
    )
    assert set(data["sanity"]["methods"]) == {"gradcam"}  # DFF draws concepts, not maps
    assert isinstance(data["sanity"]["methods"]["gradcam"]["passes"], bool)
    assert set(data["faithfulness"]["methods"]) == {"gradcam"}
    assert any(f.startswith("saliency/sanity/") and f.endswith(".txt") for f in files)


def test_wandb_offline_run_holds_every_grid_score_and_alarm_and_alerts_once_a_run(real_loggers):
    """Read back from the offline run's files: its media and its history records."""
    from helpers import wandb_offline_records

    (run_dir,) = (real_loggers.root / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "saliency").glob("gradcam_*.png"))) == 2
    assert len(list((media / "images" / "saliency").glob("overview_*.png"))) == 2
    tables = list((media / "table" / "saliency_alarms").glob("alarms_*.table.json"))
    assert len(tables) == 2
    assert any("corner_enrichment" in t.read_text() for t in tables)
    records = wandb_offline_records(next(run_dir.glob("run-*.wandb")))
    keys = {
        item.key or "/".join(item.nested_key)
        for record in records
        if record.WhichOneof("record_type") == "history"
        for item in record.history.item
    }
    assert "saliency/gradcam/corner_enrichment" in keys  # the score's chart
    assert "saliency/gradcam/_type" in keys  # the grid, an image in the history
    # a row per fixed sample at each logged run: its input (with its object mask as an
    # overlay), label, prediction, confidence, each method's tile and its scores. Offline, W&B
    # keeps a table's pictures in the run's table artifact (staged until a sync)
    staged = [
        (entry.path, Path(entry.local_path))
        for record in records
        if record.WhichOneof("record_type") == "artifact"
        and "saliencysamples" in record.artifact.name
        for entry in record.artifact.manifest.contents
    ]
    tables = [local for path, local in staged if path == "saliency/samples.table.json"]
    assert len(tables) == 2  # each logged run
    table = json.loads(tables[-1].read_text())
    columns = table["columns"]
    assert columns[:5] == ["sample", "image", "label", "prediction", "confidence"]
    assert {"gradcam", "dff", "gradcam/corner_enrichment", "gradcam/drift_prev"} <= set(columns)
    assert len(table["data"]) == 4
    row = dict(zip(columns, table["data"][0]))
    assert row["image"]["_type"] == "image-file" and "object" in row["image"]["masks"]
    assert row["gradcam"]["_type"] == "image-file"
    assert isinstance(row["gradcam/corner_enrichment"], float) and 0 <= row["confidence"] <= 1
    pictures = {path: local for path, local in staged if path.endswith(".png")}
    tile = Image.open(pictures[row["gradcam"]["path"]])
    assert tile.mode == "RGB" and tile.size[0] >= 32
    # one alert per logged run with news about the model (the corner alarm, raised at the
    # first); W&B itself sends one of a title per wait_duration at most
    assert len(real_loggers.alerts) == 1
    (alert,) = real_loggers.alerts
    assert "corner_enrichment" in alert["text"] and alert["level"] == "WARN"
    assert alert["wait_duration"] == WandbSink.ALERT_EVERY_S


def test_csv_gets_metrics_pictures_alarms_and_the_trust_report_as_files(real_loggers):
    folder = real_loggers.csv
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "saliency/gradcam/corner_enrichment" in header
    assert len(list((folder / "saliency" / "gradcam").glob("step_*.png"))) == 2
    assert "corner_enrichment" in (folder / "alarms.txt").read_text()
    (report,) = folder.glob("sanity_step_*.json")
    assert "gradcam" in json.loads(report.read_text())["sanity"]["methods"]


def test_two_named_callbacks_merge_their_custom_scalars_layouts(tmp_path):
    """TensorBoard's custom-scalars plugin reads the latest layout of a run: it must hold the
    charts of both callbacks."""
    import lightning as L
    from helpers import read_events, tiny_datamodule, tiny_model, trainer
    from tensorboard.plugins.custom_scalar import layout_pb2

    from lightning_saliency import SaliencyCallback

    pair = [
        SaliencyCallback(methods=("gradcam",), num_samples=4, name="deep"),
        SaliencyCallback(methods=("gradcam",), num_samples=4, name="early",
                         target_layer="features.2"),
    ]  # fmt: skip
    L.seed_everything(0)
    trainer(str(tmp_path), pair, max_epochs=1, limit_train_batches=1).fit(
        tiny_model(width=4), tiny_datamodule(size=16, n_train=8, n_val=8)
    )
    events = read_events(str(tmp_path))
    layouts = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layouts[-1].tensor_proto.string_val[0])
    categories = {c.title: [chart.title for chart in c.chart] for c in layout.category}
    assert {"saliency/deep", "saliency/early"} <= set(categories)
    assert "gradcam corner_enrichment" in categories["saliency/early"]


# -- TensorBoard's event checksum: the same bytes, without TensorBoard's pure-Python loop ------
def test_event_checksum_equals_tensorboards_own_at_every_length():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from lightning_saliency.publish.event_checksum import masked

    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 4, 7, 8, 12, 15, 16, 17, 63, 64, 65, 255, 256, 257, 4096, 5000]
    lengths += [int(n) for n in rng.integers(1, 20_000, 12)]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked(data) == masked_crc32c(data), n


@pytest.mark.parametrize("implementation", ["c", "python", "not installed"])
def test_the_fit_writes_tensorboard_records_with_the_fast_checksum_and_restores_it(
    tmp_path, monkeypatch, implementation
):
    """With google-crc32c's C implementation the fit checksums in C and puts TensorBoard's own
    function back after; with only its pure-Python fallback, or without the package,
    TensorBoard's function is left alone. The files pass TensorBoard's own check either way."""
    import google_crc32c
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    from lightning_saliency.publish import event_checksum

    if implementation == "c" and google_crc32c.implementation != "c":
        pytest.fail("google-crc32c has no C implementation here: its wheel should bring one")
    if implementation == "not installed":
        monkeypatch.setattr(event_checksum, "google_crc32c", None)
    else:
        monkeypatch.setattr(google_crc32c, "implementation", implementation)
    tensorboards_own = record_writer.masked_crc32c
    seen = []

    class Look(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(record_writer.masked_crc32c)

    tr = trainer(str(tmp_path), [SaliencyCallback(methods=("gradcam",)), Look()])
    tr.fit(tiny_model(), tiny_datamodule())
    during = event_checksum.masked if implementation == "c" else tensorboards_own
    assert seen and all(f is during for f in seen)  # during the fit
    assert record_writer.masked_crc32c is tensorboards_own  # and TensorBoard's own after it
    # every record of the event files passes TensorBoard's own check of its checksums
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert files
    records = 0
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            header = raw[offset : offset + 8]
            (length,) = np.frombuffer(header, dtype="<u8")
            (header_crc,) = np.frombuffer(raw[offset + 8 : offset + 12], dtype="<u4")
            data = raw[offset + 12 : offset + 12 + int(length)]
            end = offset + 12 + int(length)
            (data_crc,) = np.frombuffer(raw[end : end + 4], dtype="<u4")
            assert pywrap_tensorflow.masked_crc32c(header) == header_crc
            assert pywrap_tensorflow.masked_crc32c(data) == data_crc
            offset, records = end + 4, records + 1
        assert sum(1 for _ in RawEventFileLoader(str(path)).Load()) > 0
    assert records > 10
