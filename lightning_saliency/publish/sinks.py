"""Each Lightning logger in its own idiom: TensorBoard (image summaries with our PNG encoding,
text, custom-scalars layouts), W&B and MLflow (their image and text APIs), and PNG files for
CSV and any other logger. One adapter (:class:`ImageSink`) per logger.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import Tensor


class ImageSink:
    """Writes images (and optional text) for one Lightning logger."""

    takes_tables = False  # whether :meth:`table` shows anything (built only for those that do)

    def __init__(self, logger: Logger) -> None:
        self.logger: Any = logger  # each adapter uses its own logger's API

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        raise NotImplementedError

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: B027 (optional)
        """Loggers without a text API get nothing; captions are burnt into the pictures."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:  # noqa: B027
        """Scalars written beside Lightning's metrics (thresholds): TensorBoard only."""

    def close(self) -> None:  # noqa: B027
        """Close what the sink opened itself (TensorBoard's thresholds run)."""

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:  # noqa: B027
        """A custom-scalars layout (TensorBoard only): category -> chart -> tags."""

    def record(self, tag: str, data: Mapping[str, Any], step: int) -> None:  # noqa: B027
        """A report as data (JSON): loggers that keep files (MLflow, CSV) only."""

    def alert(self, title: str, text: str) -> None:  # noqa: B027
        """A notice that reaches a person outside the dashboard (W&B alerts) only."""

    def table(  # noqa: B027
        self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
    ) -> None:
        """A table with a row per sample (W&B only; cells as
        :mod:`lightning_saliency.viz.sample_table` makes them)."""

    def save_png(self, picture: Tensor, path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(picture))
        return path


PNG_LEVEL = 1  # zlib level: 3.4x faster than PIL's default 6 on our grids, files ~10 % larger


def encode_png(picture: Tensor) -> bytes:
    """A ``uint8 (3, H, W)`` host picture as PNG bytes, at :data:`PNG_LEVEL`.

    Examples:
        >>> import torch
        >>> encode_png(torch.zeros(3, 2, 2, dtype=torch.uint8))[:4]
        b'\x89PNG'
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(
        buffer, format="PNG", compress_level=PNG_LEVEL
    )
    return buffer.getvalue()


THRESHOLDS_RUN = "thresholds"  # the run, under a TensorBoard logger's log_dir, of thresholds


class TensorBoardSink(ImageSink):
    def __init__(self, logger: Logger) -> None:
        super().__init__(logger)
        self._thresholds: Any = None  # the thresholds run's writer, opened at first use

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
        """Thresholds go to a run of their own, ``<log_dir>/thresholds``: TensorBoard colours
        each run differently, so in the custom-scalars chart that pairs a score with its
        threshold the two lines never share a colour (in one run they did; only the marker
        told them apart)."""
        writer = self._thresholds_writer()
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()  # a few scalars per logged run, on the writer's thread

    def _thresholds_writer(self) -> Any:
        if self._thresholds is None:
            from torch.utils.tensorboard import SummaryWriter

            self._thresholds = SummaryWriter(os.path.join(self.logger.log_dir, THRESHOLDS_RUN))
        return self._thresholds

    def close(self) -> None:
        if self._thresholds is not None:
            self._thresholds.close()
            self._thresholds = None

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
    ALERT_EVERY_S = 300  # W&B sends one alert of a title per this many seconds at most
    takes_tables = True

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.logger.log_image(key=tag, images=[picture.permute(1, 2, 0).numpy()], step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)

    def table(
        self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
    ) -> None:
        """A ``wandb.Table``: pictures as ``wandb.Image``, an input with its object mask as an
        overlay a person toggles in the W&B table."""
        import wandb

        def cell(value: Any) -> Any:
            if isinstance(value, tuple):
                image, mask = value
                labels = {0: "background", 1: "object"}
                return wandb.Image(
                    image, masks={"object": {"mask_data": mask, "class_labels": labels}}
                )
            if getattr(value, "ndim", 0) == 3:
                return wandb.Image(value)
            return value

        data = [[cell(value) for value in row] for row in rows]
        self.logger.log_table(key=tag, columns=list(columns), data=data, step=step)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail or Slack, as the user set it up; nothing offline), at most one
        of a title per :data:`ALERT_EVERY_S` seconds."""
        self.logger.experiment.alert(
            title=title, text=text, level="WARN", wait_duration=self.ALERT_EVERY_S
        )


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

    def record(self, tag: str, data: Mapping[str, Any], step: int) -> None:
        client, run_id = self.logger.experiment, self.logger.run_id
        client.log_dict(run_id, dict(data), f"{tag}/step_{step:06d}.json")


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

    def record(self, tag: str, data: Mapping[str, Any], step: int) -> None:
        """``<log_dir>/<tag after its first segment>_step_XXXXXX.json``."""
        name = "_".join(tag.split("/")[1:]) or tag
        path = os.path.join(self.root(), f"{name}_step_{step:06d}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)


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
