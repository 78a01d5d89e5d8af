"""A real browser looks at TensorBoard's Images dashboard: the logged grid is on screen.

Headless Debian Chromium (no downloaded browser) takes a screenshot of the dashboard that a
real TensorBoard server serves over the callback's logs; the test finds the colour bar's known
pixels (the colour scale, left to right) in it. CI installs Chromium and sets
``REQUIRE_BROWSER=1``; elsewhere the test skips only when no Chromium is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import lightning as L
import numpy as np
import pytest
import torch
from helpers import tiny_datamodule, tiny_model, trainer
from PIL import Image

from lightning_saliency import SaliencyCallback, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def colour_bar_rows(screenshot: np.ndarray, tolerance: int = 40) -> list[int]:
    """Rows of ``screenshot`` (H, W, 3) that hold the sequential colour bar: pixels close to
    the scale at 10 %, 50 % and 90 %, in that order from left to right."""
    lut = render.colormap_lut(render.SEQUENTIAL, torch.device("cpu")).numpy() * 255
    marks = [lut[int(f * 255)] for f in (0.1, 0.5, 0.9)]
    found = []
    pixels = screenshot.astype(np.int32)
    for y in range(pixels.shape[0]):
        row = pixels[y]
        columns = []
        for mark in marks:
            near = np.nonzero(np.abs(row - mark).max(axis=1) <= tolerance)[0]
            columns.append(near)
        ordered = all(len(c) for c in columns) and (
            columns[0].min() < np.median(columns[1]) < columns[2].max()
        )
        if ordered:
            found.append(y)
    return found


@pytest.mark.slow
def test_the_images_dashboard_shows_the_grid_with_its_colour_bar(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium installed (CI installs it and sets REQUIRE_BROWSER=1)")
    L.seed_everything(0)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    trainer(str(tmp_path / "logs"), [callback], max_epochs=1).fit(
        tiny_model(), tiny_datamodule(n_train=16, n_val=8)
    )
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shot = tmp_path / "dashboard.png"
    try:
        deadline = time.time() + 40
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags")
                break
            except OSError:
                time.sleep(0.5)
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,1000", "--virtual-time-budget=20000",
             f"--screenshot={shot}", f"http://127.0.0.1:{port}/#images"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert shot.exists(), "chromium took no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    rows = colour_bar_rows(pixels)
    assert rows, "the grid's colour bar is not on the Images dashboard"


def test_the_colour_bar_finder_finds_a_bar_and_nothing_else():
    bar = render.colour_bar(300, 1.0, False, torch.device("cpu"))
    picture = (render.to_uint8(bar).permute(1, 2, 0).numpy()).astype(np.uint8)
    assert colour_bar_rows(picture)
    assert not colour_bar_rows(np.full((40, 300, 3), 200, dtype=np.uint8))
