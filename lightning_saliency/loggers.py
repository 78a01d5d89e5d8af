"""Where finished pictures go: TensorBoard first; WandB, MLflow and files for the rest.

Each adapter takes a ``uint8`` ``(3, H, W)`` CPU tensor: the only thing that crosses from the
device to the host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import Tensor


class ImageSink:
    """Writes images (and optional text) for one Lightning logger."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        raise NotImplementedError

    def text(self, tag: str, text: str, step: int) -> None:  # noqa: B027 (optional)
        """Most loggers have no text panel; captions are burnt into the pictures anyway."""

    def save_png(self, picture: Tensor, path: str) -> str:
        from PIL import Image

        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
        return path


class TensorBoardSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.logger.experiment.add_image(tag, picture.numpy(), global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.experiment.add_text(tag, text, global_step=step)


class WandbSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.logger.log_image(key=tag, images=[picture.permute(1, 2, 0).numpy()], step=step)


class MLFlowSink(ImageSink):
    def image(self, tag: str, picture: Tensor, step: int) -> None:
        array = picture.permute(1, 2, 0).numpy()
        client, run_id = self.logger.experiment, self.logger.run_id
        try:
            client.log_image(run_id, array, key=tag.replace("/", "_"), step=step)
        except TypeError:  # mlflow < 2.12 has no key/step: one artifact per step
            client.log_image(run_id, array, f"{tag}/step_{step:06d}.png")


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


def log_dir_of(sinks: Sequence[ImageSink]) -> str | None:
    """A local directory next to the logs (for the timeline PNG), if a logger has one."""
    for sink in sinks:
        for attr in ("log_dir", "save_dir"):
            value: Any = getattr(sink.logger, attr, None)
            if isinstance(value, str):
                return value
    return None
