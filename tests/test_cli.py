"""The one-image command line, as a user runs it: a subprocess, real photographs, checkpoints."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torchvision
from PIL import Image

from lightning_saliency.demo import ShapesClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "lightning_saliency.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd or ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(str(path))
    (folder / "broken.png").write_bytes(b"not a png at all")
    return paths, str(folder / "broken.png")


def _figure(path):
    picture = Image.open(path)
    picture.verify()
    return Image.open(path)


def test_arch_with_weights_file_renders_a_row_per_image(tmp_path, photos):
    paths, _ = photos
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "figure.png"
    proc = _cli(
        "explain",
        "--arch",
        "resnet18",
        "--weights",
        str(weights),
        "--image",
        paths[0],
        "--image",
        paths[1],
        "--methods",
        "gradcam,dff",
        "--size",
        "64",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "[2/3]" in proc.stderr and "done" in proc.stderr  # progress on stderr
    picture = _figure(out)
    assert picture.height > 2 * 64 and picture.width > 3 * 64  # 2 rows: input + 2 methods


def test_lightning_checkpoint_loads_safely(tmp_path, photos):
    paths, _ = photos
    model = ShapesClassifier(num_classes=4, width=8)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "fig.png"
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\nsquare\ntriangle\ncross\n")
    proc = _cli(
        "explain",
        "--model",
        "lightning_saliency.demo:ShapesClassifier",
        "--checkpoint",
        str(ckpt),
        "--image",
        paths[2],
        "--size",
        "48",
        "--methods",
        "gradcam,guided_gradcam,ig",
        "--ig-steps",
        "8",
        "--target",
        "2",
        "--labels",
        str(labels),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert _figure(out).width > 4 * 48


def test_plain_module_factory_with_state_dict(tmp_path, photos):
    paths, _ = photos
    (tmp_path / "mymodels.py").write_text(
        "import torchvision\ndef small():\n    return torchvision.models.resnet18(num_classes=3)\n"
    )
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=3).state_dict()}, weights)
    proc = _cli(
        "explain",
        "--model",
        "mymodels:small",
        "--checkpoint",
        str(weights),
        "--image",
        paths[0],
        "--size",
        "64",
        "--methods",
        "layercam",
        "--out",
        "f.png",
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet18", "--image", "missing.png"], "no such image: missing.png"),
        (["--arch", "resnet18", "--image", "BROKEN"], "cannot read image"),
        (["--arch", "resnet18", "--image", "PHOTO", "--target", "5000"], "out of range"),
        (
            ["--arch", "resnet18", "--image", "PHOTO", "--methods", "gradcam,lime"],
            "unknown saliency method 'lime'",
        ),
        (["--arch", "resnet99", "--image", "PHOTO"], "unknown torchvision architecture"),
        (["--model", "nowhere.models:Net", "--image", "PHOTO"], "cannot import"),
        (["--arch", "resnet18", "--weights", "none.pth", "--image", "PHOTO"], "no such file"),
        (
            ["--arch", "resnet18", "--image", "PHOTO", "--target-layer", "layer5"],
            "Closest names: layer",
        ),
        (["--image", "PHOTO"], "exactly one of --model"),
    ],
)
def test_bad_input_is_one_clear_line(photos, args, message):
    paths, broken = photos
    args = [a.replace("PHOTO", paths[0]).replace("BROKEN", broken) for a in args]
    proc = _cli("explain", "--size", "32", "--methods", "gradcam", *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_unsafe_checkpoint_needs_opt_in(tmp_path, photos):
    paths, _ = photos

    state = torchvision.models.resnet18(num_classes=2).state_dict()
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "extra": Image.new("RGB", (2, 2))}, path)  # not allow-listed
    args = [
        "explain",
        "--arch",
        "resnet18",
        "--weights",
        str(path),
        "--image",
        paths[0],
        "--size",
        "32",
        "--methods",
        "gradcam",
        "--out",
        str(tmp_path / "x.png"),
    ]
    proc = _cli(*args)
    assert proc.returncode != 0 and "--unsafe-load" in proc.stderr
    proc = _cli(*args, "--unsafe-load")
    assert proc.returncode == 0, proc.stderr


def test_help_lists_every_option_and_method():
    proc = _cli("explain", "--help")
    assert proc.returncode == 0
    for option in (
        "--model",
        "--checkpoint",
        "--arch",
        "--weights",
        "--image",
        "--methods",
        "--target",
        "--target-layer",
        "--alpha",
        "--rows",
        "--out",
        "--device",
    ):
        assert option in proc.stdout
    assert "scorecam" in proc.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("lightning-saliency", path=os.path.dirname(sys.executable))
    assert exe, "pip install -e . installs the console script"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "explain" in proc.stdout
