"""The real TensorBoard server reads what the callback wrote (HTTP data API, 127.0.0.1)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import lightning as L
import pytest
from helpers import tiny_datamodule, tiny_model, trainer

from lightning_saliency import SaliencyCallback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.slow
def test_tensorboard_server_serves_saliency_images(tmp_path):
    L.seed_everything(0)
    callback = SaliencyCallback(num_samples=4, methods=("gradcam", "dff"))
    dm = tiny_datamodule(n_train=16, n_val=8)
    trainer(str(tmp_path), [callback], max_epochs=12).fit(tiny_model(), dm)

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--samples_per_plugin",
            "images=500",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    base = f"http://127.0.0.1:{port}/data/plugin/images"
    try:
        tags = {}
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                tags = json.loads(_get(f"{base}/tags"))
                if any("saliency/gradcam" in t for t in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(1)
        run, run_tags = next((r, t) for r, t in tags.items() if "saliency/gradcam" in t)
        assert {"saliency/gradcam", "saliency/dff", "saliency/overview"} <= set(run_tags)
        query = urllib.parse.urlencode({"run": run, "tag": "saliency/gradcam"})
        entries = []
        while time.time() < deadline and len(entries) < 12:  # the server loads lazily
            entries = json.loads(_get(f"{base}/images?{query}"))
            time.sleep(0.5)
        # All 12 epochs: TensorBoard keeps 10 by default. (images=0, the documented "keep
        # all", makes TensorBoard 2.21's image plugin serve none: use a large number.)
        assert len(entries) == 12
        png = _get(f"{base}/individualImage?{entries[-1]['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(png) > 1000
        # The alarm text of every logged epoch, and the custom-scalars layout with thresholds.
        root = f"http://127.0.0.1:{port}/data/plugin"
        query = urllib.parse.urlencode({"run": run, "tag": "saliency_alarms/alarms/text_summary"})
        texts = []
        while time.time() < deadline and len(texts) < 12:
            texts = json.loads(_get(f"{root}/text/text?{query}"))
            time.sleep(0.5)
        assert len(texts) == 12 and all("raised now" in t["text"] for t in texts)
        layout = json.loads(_get(f"{root}/custom_scalars/layout"))
        charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
        tags = charts["gradcam corner_enrichment"]["multiline"]["tag"]
        assert tags == ["saliency/gradcam/corner_enrichment",
                        "saliency_alarms/gradcam/corner_enrichment/threshold"]  # fmt: skip
        # the thresholds are a run of their own, which TensorBoard colours apart from the
        # scores; the score stays in the callback's run
        scalars = json.loads(_get(f"{root}/scalars/tags"))
        threshold = "saliency_alarms/gradcam/corner_enrichment/threshold"
        assert threshold in scalars.get(f"{run}/thresholds", {})
        assert (
            threshold not in scalars[run] and "saliency/gradcam/corner_enrichment" in scalars[run]
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
