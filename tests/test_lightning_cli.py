"""SaliencyCallback from YAML and from the command line of a real LightningCLI."""

import os
import subprocess
import sys

import pytest
from helpers import read_events

SCRIPT = """
from lightning.pytorch.cli import LightningCLI
from lightning_saliency.demos import ShortcutDataModule
from lightning_saliency.demos.classifier import ShapesClassifier
LightningCLI(ShapesClassifier, ShortcutDataModule)
"""

CONFIG = """
trainer:
  max_epochs: 2
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {logs}}}
  callbacks:
    - class_path: lightning_saliency.SaliencyCallback
      init_args:
        methods: [gradcam, dff]
        num_samples: 4
        target: pred
        thresholds: {{corner_enrichment: 4.0}}
        method_every_n_epochs: {{dff: 2}}
        ig_steps: auto
data:
  n_train: 64
  n_val: 16
  size: 32
  batch_size: 16
model:
  width: 8
"""


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), "fit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env={**os.environ},
    )


@pytest.mark.slow
def test_yaml_config_sets_the_callback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(logs=tmp_path / "logs"))
    proc = _run(tmp_path, "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(str(tmp_path / "logs"))
    assert len(events.Images("saliency/gradcam")) == 2
    assert len(events.Images("saliency/dff")) == 1  # method_every_n_epochs from YAML


@pytest.mark.slow
def test_command_line_adds_the_callback(tmp_path):
    proc = _run(
        tmp_path,
        "--trainer.max_epochs=1",
        "--data.n_train=64",
        "--data.n_val=16",
        "--data.size=32",
        "--model.width=8",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--trainer.callbacks+=lightning_saliency.SaliencyCallback",
        "--trainer.callbacks.methods=[gradcam,dff]",
        "--trainer.callbacks.num_samples=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = set(read_events(str(tmp_path / "logs")).Tags()["images"])
    assert {"saliency/gradcam", "saliency/dff"} <= tags
    assert "saliency/integrated_gradients" not in tags
