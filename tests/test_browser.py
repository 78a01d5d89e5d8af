"""A real browser looks at TensorBoard: the logged grid is on the Images dashboard, and each
custom-scalars chart draws a threshold in another colour than its score.

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

from lightning_saliency import SaliencyCallback
from lightning_saliency.viz import render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def colour_bar_rows(screenshot: np.ndarray, tolerance: int = 40, run: int = 120) -> list[int]:
    """Rows of ``screenshot`` (H, W, 3) that hold the sequential colour bar: ``run`` or more
    pixels in a row, each close to the scale, whose positions on the scale never go back and
    span it from under 10 % to over 90 % (an overlay's blob has no such ramp)."""
    lut = render.colormap_lut(render.SEQUENTIAL, torch.device("cpu")).numpy() * 255
    pixels = screenshot.astype(np.int32)
    start = lut[int(0.1 * 255)]
    candidates = np.nonzero((np.abs(pixels - start).max(axis=2) <= tolerance).any(axis=1))[0]
    found = []
    for y in candidates:
        distance = np.abs(pixels[y][:, None, :] - lut[None].astype(np.int32)).max(axis=2)
        index = distance.argmin(axis=1)
        close = distance.min(axis=1) <= tolerance
        length, low, high, previous = 0, 255, 0, -1
        for x in range(pixels.shape[1]):
            if close[x] and index[x] >= previous - 8:  # a ramp, allowing for rounding
                length, previous = length + 1, max(previous, index[x])
                low, high = min(low, index[x]), max(high, index[x])
                if length >= run and low < 26 and high > 229:
                    found.append(int(y))
                    break
            else:
                length, low, high, previous = 0, 255, 0, -1
    return found


def _need_browser() -> None:
    """Skip without Chromium, unless CI asked for it (then fail)."""
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium installed (CI installs it and sets REQUIRE_BROWSER=1)")


def _screenshot(logdir, page: str, shot, ready: str) -> np.ndarray:
    """A screenshot of TensorBoard's ``page`` (``#images``, ``#custom_scalars``) served over
    ``logdir`` by a real server, once its ``ready`` data route answers."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 40
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/{ready}")
                break
            except OSError:
                time.sleep(0.5)
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,1000", "--virtual-time-budget=20000",
             f"--screenshot={shot}", f"http://127.0.0.1:{port}/{page}"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert shot.exists(), "chromium took no screenshot"
    return np.asarray(Image.open(shot).convert("RGB"))


@pytest.mark.slow
def test_the_images_dashboard_shows_the_grid_with_its_colour_bar(tmp_path):
    _need_browser()
    L.seed_everything(0)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    trainer(str(tmp_path / "logs"), [callback], max_epochs=1).fit(
        tiny_model(), tiny_datamodule(n_train=16, n_val=8)
    )
    pixels = _screenshot(tmp_path / "logs", "#images", tmp_path / "dashboard.png", "images/tags")
    rows = colour_bar_rows(pixels)
    assert rows, "the grid's colour bar is not on the Images dashboard"


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 30) -> int:
    return int((np.abs(pixels.astype(np.int32) - colour).max(axis=2) <= tolerance).sum())


@pytest.mark.slow
def test_the_custom_scalars_charts_draw_each_threshold_apart_from_its_score(tmp_path):
    """Each chart pairs a score with its threshold. In one run both lines took the run's
    colour and only the marker told them apart; the thresholds are now a run of their own,
    which TensorBoard colours differently (its first two run colours, orange and blue)."""
    _need_browser()
    L.seed_everything(0)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    trainer(str(tmp_path / "logs"), [callback], max_epochs=3).fit(
        tiny_model(), tiny_datamodule(n_train=16, n_val=8)
    )
    shot = tmp_path / "custom_scalars.png"
    pixels = _screenshot(tmp_path / "logs", "#custom_scalars", shot, "custom_scalars/layout")
    charts = pixels[150:, 380:]  # right of the runs' list: the charts only
    scores, thresholds = _near(charts, (255, 112, 67)), _near(charts, (0, 119, 187))
    assert scores > 500 and thresholds > 500, (scores, thresholds)


def test_the_colour_bar_finder_finds_a_bar_and_nothing_else():
    bar = render.colour_bar(300, 1.0, False, torch.device("cpu"))
    picture = (render.to_uint8(bar).permute(1, 2, 0).numpy()).astype(np.uint8)
    assert colour_bar_rows(picture)
    assert not colour_bar_rows(np.full((40, 300, 3), 200, dtype=np.uint8))
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(300.0), indexing="ij")
    blob = torch.exp(-((xx - 150) ** 2 + (yy - 80) ** 2) / 2000)[None]  # a Grad-CAM-like map
    tile = render.overlay(torch.full((1, 3, 160, 300), 0.5), blob)[0]
    assert not colour_bar_rows(render.to_uint8(tile).permute(1, 2, 0).numpy())
