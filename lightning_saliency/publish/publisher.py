"""Where finished pictures go: :class:`Publisher` copies each finished ``uint8`` ``(3, H, W)``
picture from the device to the host once and hands it to every logger's adapter
(:mod:`lightning_saliency.publish.sinks`), on a background writer thread when asked
(:mod:`lightning_saliency.publish.writer`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_saliency.publish import event_checksum
from lightning_saliency.publish.sinks import ImageSink, TensorBoardSink, sinks_for
from lightning_saliency.publish.writer import BackgroundWriter


class Publisher:
    """Sends pictures, text and scalars to every logger of a run (rank zero only: the caller
    decides).

    Each picture is copied to the host on the calling thread (one copy); with
    ``background=True`` the rest (PNG encoding, event writes, logger API calls) runs on a
    :class:`~.writer.BackgroundWriter`, in order, and :meth:`flush` waits for
    it. A logger whose call fails stops receiving pictures; :meth:`failures` returns each such
    failure once, for the caller's warning. With a TensorBoard logger, TensorBoard's event
    records are checksummed by :mod:`.event_checksum` (the same bytes, ~20x
    faster than its pure-Python loop) until :meth:`close`.

    Examples:
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

    def record(self, tag: str, data: Mapping[str, Any], step: int) -> None:
        """A report as data, to the loggers that keep files."""
        self._each_sink(lambda sink: sink.record(tag, data, step))

    @property
    def takes_tables(self) -> bool:
        """Whether any logger shows per-sample tables (W&B)."""
        return any(sink.takes_tables for sink in self.sinks)

    def table(
        self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
    ) -> None:
        """A table with a row per sample, to the loggers that show tables."""
        self._each_sink(lambda sink: sink.table(tag, columns, rows, step))

    def alert(self, title: str, text: str) -> None:
        """A notice to the loggers that reach people outside the dashboard (W&B alerts)."""
        self._each_sink(lambda sink: sink.alert(title, text))

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
            for sink in self.sinks:
                sink.close()
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
