"""Non-TensorBoard loggers get the same pictures through their own image APIs."""

import lightning as L
import numpy as np
import pytest
from helpers import tiny_datamodule, tiny_model, trainer
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger

from lightning_saliency import SaliencyCallback
from lightning_saliency.publish.sinks import FileSink, MLFlowSink, WandbSink, sink_for


class Offline:
    """What a fake logger needs besides its image API: no account, no files, no server."""

    def __init__(self):
        L.pytorch.loggers.Logger.__init__(self)

    def finalize(self, status="success"):
        pass

    def after_save_checkpoint(self, checkpoint_callback):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    @property
    def name(self):
        return "fake"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return None


class FakeWandb(Offline, WandbLogger):
    """A WandbLogger that records ``log_image`` calls instead of needing a wandb account."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.texts = []
        self._experiment = None

    @property
    def experiment(self):
        return None

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step))

    def log_text(self, key, columns=None, data=None, step=None, **kwargs):
        self.texts.append((key, data, step))


class FakeMlflowClient:
    def __init__(self):
        self.calls = []
        self.texts = []

    def log_image(self, run_id, image, key=None, step=None):
        self.calls.append((run_id, image, key, step))

    def log_text(self, run_id, text, artifact_file):
        self.texts.append((run_id, text, artifact_file))


class FakeMLFlow(Offline, MLFlowLogger):
    """An MLFlowLogger whose client records ``log_image`` calls."""

    def __init__(self):
        super().__init__()
        self.client = FakeMlflowClient()

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self):
        return "run-1"


def test_dispatch_by_logger_type():
    assert isinstance(sink_for(FakeWandb()), WandbSink)
    assert isinstance(sink_for(FakeMLFlow()), MLFlowSink)
    assert sink_for(DummyLogger()) is None
    assert isinstance(sink_for(L.pytorch.loggers.CSVLogger("x")), FileSink)


def test_wandb_and_mlflow_receive_every_grid(tmp_path):
    wandb, mlflow = FakeWandb(), FakeMLFlow()
    callback = SaliencyCallback(num_samples=4, methods=("gradcam", "dff"))
    L.seed_everything(0)
    trainer(None, [callback], logger=[wandb, mlflow], max_epochs=2).fit(
        tiny_model(), tiny_datamodule()
    )
    keys = [c[0] for c in wandb.calls]
    assert keys.count("saliency/gradcam") == 2 and "saliency/overview" in keys
    image = wandb.calls[0][1][0]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[2] == 3
    ml_keys = [c[2] for c in mlflow.client.calls]
    assert ml_keys.count("saliency_gradcam") == 2
    assert all(c[0] == "run-1" and c[3] is not None for c in mlflow.client.calls)
    assert [t[0] for t in wandb.texts].count("saliency_alarms/alarms") == 2  # each logged run
    assert sum("saliency_alarms/alarms" in t[2] for t in mlflow.client.texts) == 2


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
