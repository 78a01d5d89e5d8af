"""The background writer: pictures leave the training thread, arrive in order and complete
(after fit, after a crash), memory stays bounded under a slow logger, and a failing logger is
said once and stops alone."""

import logging
import threading
import time

import lightning as L
import pytest
import torch
from helpers import read_events, tiny_datamodule, tiny_model, trainer, writer_threads
from lightning.pytorch.loggers import CSVLogger

from lightning_saliency import SaliencyCallback
from lightning_saliency.publish.sinks import TensorBoardSink
from lightning_saliency.publish.writer import BackgroundWriter


def test_jobs_run_in_order_off_the_calling_thread():
    writer = BackgroundWriter(capacity=3)
    seen = []
    for i in range(20):
        writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert writer.flush() == []
    assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"lightning-saliency-writer"}
    writer.close()


def test_a_full_queue_makes_the_caller_wait_and_says_so_once(caplog):
    """Slow jobs holding 4 MB each: at most ``capacity`` wait in the queue (plus the one
    running), every job runs, and the wait is said once."""
    writer = BackgroundWriter(capacity=2)
    alive, most = [0], [0]
    lock = threading.Lock()

    def job(payload):
        time.sleep(0.02)
        with lock:
            alive[0] -= 1
        del payload

    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        for _ in range(10):
            payload = torch.zeros(1 << 20)  # 4 MB, released when its job has run
            with lock:
                alive[0] += 1
                most[0] = max(most[0], alive[0])
            writer.submit(lambda payload=payload: job(payload))
            del payload
        writer.flush()
    assert most[0] <= writer.capacity + 2  # queued + running + the one being submitted
    assert alive[0] == 0 and writer.waited >= 1
    said = [r for r in caplog.records if "slower than the logged epochs" in r.getMessage()]
    assert len(said) == 1
    writer.close()


def test_an_error_in_a_job_is_kept_for_the_flush():
    writer = BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    ran = []
    writer.submit(lambda: ran.append(True))
    errors = writer.flush()
    assert [type(e) for e in errors] == [ZeroDivisionError] and ran == [True]
    writer.close()


@pytest.fixture
def slow_tensorboard(monkeypatch):
    """TensorBoard's image writes take 0.3 s each, so pictures are still queued when the
    training thread reaches the end of the run."""
    real = TensorBoardSink.image
    threads = set()

    def slow(self, tag, picture, step):
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        real(self, tag, picture, step)

    monkeypatch.setattr(TensorBoardSink, "image", slow)
    return threads


def test_every_picture_arrives_after_fit_from_the_writer_thread(tmp_path, slow_tensorboard):
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    L.seed_everything(0)
    tr = trainer(str(tmp_path), [callback], max_epochs=3)
    tr.fit(tiny_model(), tiny_datamodule())
    events = read_events(str(tmp_path))
    steps = [e.step for e in events.Images("saliency/gradcam")]
    assert steps == [e.step for e in events.Scalars("val_acc/dataloader_idx_0")]
    assert len(events.Images("saliency/timeline")) == 3
    assert slow_tensorboard == {"lightning-saliency-writer"}


class CrashesInEpoch2(type(tiny_model())):  # type: ignore[misc]
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def test_pictures_queued_before_a_crash_are_written(tmp_path, slow_tensorboard):
    """Lightning closes its loggers after ``on_exception``; the callback flushes there, so
    the two logged epochs before the crash are in the event file."""
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    L.seed_everything(0)
    tr = trainer(str(tmp_path), [callback], max_epochs=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tr.fit(CrashesInEpoch2(width=8), tiny_datamodule())
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 2
    assert len(events.Images("saliency/overview")) == 2
    # Lightning calls no teardown after an exception: the writer stopped at on_exception,
    # and TensorBoard has its own event checksum back
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    assert not writer_threads()
    assert record_writer.masked_crc32c is pywrap_tensorflow.masked_crc32c


def test_a_failing_logger_is_said_once_and_only_it_stops(tmp_path, monkeypatch, caplog):
    """TensorBoard's image call fails from the first picture on: one warning naming it, its
    pictures stop, the CSV logger beside it still gets every picture, the alarm text says so,
    and training goes on."""

    def broken(self, tag, picture, step):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardSink, "image", broken)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [TensorBoardLogger(str(tmp_path / "tb")), CSVLogger(str(tmp_path / "csv"))]
    L.seed_everything(0)
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        tr = trainer(None, [callback], logger=loggers, max_epochs=3)
        tr.fit(tiny_model(), tiny_datamodule())
    said = [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()]
    assert len(said) == 1 and "TensorBoardLogger" in said[0]
    assert tr.current_epoch == 3
    csv_dir = loggers[1].log_dir
    import os

    assert len(os.listdir(os.path.join(csv_dir, "saliency", "gradcam"))) == 3
    with open(os.path.join(csv_dir, "alarms.txt")) as f:
        alarms = f.read()
    assert "writing to TensorBoardLogger failed (OSError: disk full)" in alarms
