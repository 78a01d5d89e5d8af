"""Where finished pictures go: TensorBoard first; WandB, MLflow and files for the rest.

:class:`Publisher` copies each finished ``uint8`` ``(3, H, W)`` picture from the device to the
host once and hands it to every logger's adapter (:class:`ImageSink`), on a background
writer thread when asked (:mod:`lightning_saliency.writer`).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_saliency import event_checksum
from lightning_saliency.writer import BackgroundWriter


class ImageSink:
    """Writes images (and optional text) for one Lightning logger."""

    def __init__(self, logger: Logger) -> None:
        self.logger: Any = logger  # each adapter uses its own logger's API

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        raise NotImplementedError

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: B027 (optional)
        """Loggers without a text API get nothing; captions are burnt into the pictures."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:  # noqa: B027
        """Scalars written beside Lightning's metrics (thresholds): TensorBoard only."""

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:  # noqa: B027
        """A custom-scalars layout (TensorBoard only): category -> chart -> tags."""

    def save_png(self, picture: Tensor, path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(picture))
        return path


PNG_LEVEL = 1  # zlib level: 3.4x faster than PIL's default 6 on our grids, files ~10 % larger


def encode_png(picture: Tensor) -> bytes:
    """A ``uint8 (3, H, W)`` host picture as PNG bytes, at :data:`PNG_LEVEL`.

    Example:
        >>> encode_png(torch.zeros(3, 2, 2, dtype=torch.uint8))[:4]
        b'\x89PNG'
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(
        buffer, format="PNG", compress_level=PNG_LEVEL
    )
    return buffer.getvalue()


class TensorBoardSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        """The image summary that ``add_image`` writes, with our PNG encoding (``add_image``
        encodes at PIL's slowest default level and cannot be told otherwise)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        writer = self.logger.experiment
        file_writer = getattr(writer, "_get_file_writer", None)
        if file_writer is None:  # not torch's SummaryWriter: its own add_image
            writer.add_image(tag, picture.numpy(), global_step=step, dataformats="CHW")
            return
        image = Summary.Image(
            height=picture.shape[1],
            width=picture.shape[2],
            colorspace=3,
            encoded_image_string=encode_png(picture),
        )
        file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.experiment.add_text(tag, text, global_step=step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.logger.experiment.add_scalar(tag, value, global_step=step)

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Merged with what other callbacks wrote to the same event file: TensorBoard's
        custom-scalars plugin reads the latest layout of each run."""
        writer = self.logger.experiment
        with _LAYOUTS_LOCK:  # several callbacks' writer threads
            merged = _LAYOUTS.setdefault(id(writer), {})
            for category, entries in charts.items():
                merged.setdefault(category, {}).update(entries)
            layout = {
                c: {t: ["Multiline", tags] for t, tags in e.items()} for c, e in merged.items()
            }
        writer.add_custom_scalars(layout)


_LAYOUTS: dict[int, dict[str, dict[str, list[str]]]] = {}
_LAYOUTS_LOCK = threading.Lock()


class WandbSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.logger.log_image(key=tag, images=[picture.permute(1, 2, 0).numpy()], step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)


class MLFlowSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        array = picture.permute(1, 2, 0).numpy()
        client, run_id = self.logger.experiment, self.logger.run_id
        try:
            client.log_image(run_id, array, key=tag.replace("/", "_"), step=step)
        except TypeError:  # mlflow < 2.12 has no key/step: one artifact per step
            client.log_image(run_id, array, f"{tag}/step_{step:06d}.png")

    def text(self, tag: str, text: str, step: int) -> None:
        client, run_id = self.logger.experiment, self.logger.run_id
        client.log_text(run_id, text, f"{tag}/step_{step:06d}.txt")


class FileSink(ImageSink):
    """PNG files under ``<log_dir>/<tag>/step_XXXXXX.png`` (CSVLogger and any other logger)."""

    def root(self) -> str:
        for attr in ("log_dir", "save_dir", "root_dir"):
            value = getattr(self.logger, attr, None)
            if isinstance(value, str):
                return value
        return os.path.join(os.getcwd(), "saliency_images")

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.save_png(picture, os.path.join(self.root(), tag, f"step_{step:06d}.png"))

    def text(self, tag: str, text: str, step: int) -> None:
        """Appended to ``<log_dir>/<tag after its first segment>.txt``: the alarms of
        ``saliency_alarms/alarms`` go to ``alarms.txt``."""
        name = "_".join(tag.split("/")[1:]) or tag
        path = os.path.join(self.root(), f"{name}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"step {step}:\n{text}\n\n")


def sink_for(logger: Logger) -> ImageSink | None:
    """The adapter for one logger; ``None`` for Lightning's ``DummyLogger`` (``fast_dev_run``)."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    if isinstance(logger, DummyLogger):
        return None
    if isinstance(logger, TensorBoardLogger):
        return TensorBoardSink(logger)
    if isinstance(logger, WandbLogger):
        return WandbSink(logger)
    if isinstance(logger, MLFlowLogger):
        return MLFlowSink(logger)
    if isinstance(logger, CSVLogger):
        return FileSink(logger)
    return FileSink(logger)


def sinks_for(loggers: Sequence[Logger]) -> list[ImageSink]:
    return [s for s in (sink_for(logger) for logger in loggers) if s is not None]


def metrics_step(trainer: Any) -> int:
    """The step Lightning logs validation metrics at, so pictures line up with them.

    Lightning has no public name for it: ``trainer.global_step`` counts optimizer steps (it
    differs under manual optimisation with several optimizers), while the logger connector
    logs at the fit loop's count of batches that stepped.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class Publisher:
    """Sends pictures, text and scalars to every logger of a run (rank zero only: the caller
    decides).

    Each picture is copied to the host on the calling thread (one copy); with
    ``background=True`` the rest (PNG encoding, event writes, logger API calls) runs on a
    :class:`~lightning_saliency.writer.BackgroundWriter`, in order, and :meth:`flush` waits for
    it. A logger whose call fails stops receiving pictures; :meth:`failures` returns each such
    failure once, for the caller's warning. With a TensorBoard logger, TensorBoard's event
    records are checksummed by :mod:`lightning_saliency.event_checksum` (the same bytes, ~20x
    faster than its pure-Python loop) until :meth:`close`.

    Example:
        >>> publisher = Publisher([])
        >>> publisher.images({"saliency/x": torch.zeros(3, 4, 4, dtype=torch.uint8)}, step=0)
        >>> publisher.flush(), publisher.failures()
        ([], [])
    """

    def __init__(self, loggers: Sequence[Logger], background: bool = False) -> None:
        self.sinks = sinks_for(loggers)
        self.loggers = list(loggers)
        self.writer = BackgroundWriter() if background else None
        self.stopped: dict[int, BaseException] = {}  # id(sink) -> the error that stopped it
        self._unsaid: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._checksum = contextlib.ExitStack()
        if any(isinstance(sink, TensorBoardSink) for sink in self.sinks):
            self._checksum.enter_context(event_checksum.installed())

    def _each_sink(self, call: Callable[[ImageSink], object]) -> None:
        def job() -> None:
            for sink in self.sinks:
                if id(sink) in self.stopped:
                    continue
                try:
                    call(sink)
                except Exception as err:  # that logger stops; the others and training go on
                    with self._lock:
                        self.stopped[id(sink)] = err
                        self._unsaid.append((type(sink.logger).__name__, err))

        if self.writer is None:
            job()
        else:
            self.writer.submit(job)

    def images(self, pictures: Mapping[str, Tensor], step: int) -> None:
        """Write ``tag -> uint8 (3, H, W)`` pictures at ``step``: one host copy each."""
        host = {tag: p.detach().to("cpu", torch.uint8) for tag, p in pictures.items()}

        def write(sink: ImageSink) -> None:
            for tag, picture in host.items():
                sink.image(tag, picture, step)

        self._each_sink(write)

    def drawn(self, tag: str, draw: Callable[[], Tensor], step: int) -> None:
        """A picture that ``draw()`` makes (a matplotlib figure, say), drawn on the writer's
        thread, not the training thread; ``draw`` must use only what it was given."""
        made: list[Tensor] = []

        def write(sink: ImageSink) -> None:
            if not made:
                made.append(draw().detach().to("cpu", torch.uint8))
            sink.image(tag, made[0], step)

        self._each_sink(write)

    def text(self, tag: str, text: str, step: int) -> None:
        self._each_sink(lambda sink: sink.text(tag, text, step))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars for TensorBoard beside Lightning's metrics (thresholds)."""
        frozen = dict(values)
        self._each_sink(lambda sink: sink.scalars(frozen, step))

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Scalars for every logger through its ``log_metrics``, without Lightning's
        ``self.log`` (whose per-key cost is ~1 ms): for keys nobody monitors (per class). On
        the calling thread: loggers such as CSV keep their rows in memory unguarded."""
        if not values:
            return
        for logger in self.loggers:
            try:
                logger.log_metrics(dict(values), step)
            except Exception as err:
                with self._lock:
                    self._unsaid.append((type(logger).__name__, err))

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        self._each_sink(lambda sink: sink.layout(charts))

    def save_png(self, picture: Tensor, name: str) -> str | None:
        """Save ``picture`` as ``name`` in the first logger's local directory, if any; returns
        the path (written once :meth:`flush` returns)."""
        directory = log_dir_of(self.sinks)
        if not directory:
            return None
        host = picture.detach().to("cpu", torch.uint8)
        path = os.path.join(directory, name)
        sink = self.sinks[0]
        if self.writer is None:
            return sink.save_png(host, path)
        self.writer.submit(lambda: sink.save_png(host, path))
        return path

    def flush(self) -> list[BaseException]:
        """Wait for the background writer; the errors of jobs outside any logger's call (the
        timeline PNG) are returned. Loggers' failures come from :meth:`failures`."""
        return [] if self.writer is None else self.writer.flush()

    def failures(self) -> list[tuple[str, BaseException]]:
        """``(logger class name, error)`` of each logger that failed since the last call."""
        with self._lock:
            unsaid, self._unsaid = self._unsaid, []
        if self.writer is not None:
            unsaid += [("the writer", err) for err in self.writer.take_errors()]
        return unsaid

    def close(self) -> None:
        """Flush and stop the writer's thread; TensorBoard gets its own checksum back."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self._checksum.close()


def log_dir_of(sinks: Sequence[ImageSink]) -> str | None:
    """A local directory next to the logs (for the timeline PNG), if a logger has one."""
    for sink in sinks:
        for attr in ("log_dir", "save_dir"):
            value: Any = getattr(sink.logger, attr, None)
            if isinstance(value, str):
                return value
    return None
