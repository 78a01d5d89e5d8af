"""The one-image command line, as a user runs it: a subprocess, real photographs, checkpoints."""

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightning_saliency.demos.classifier import ShapesClassifier

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
        "lightning_saliency.demos.classifier:ShapesClassifier",
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
        (["--arch", "resnet99", "--image", "PHOTO"], "unknown torchvision or timm architecture"),
        (["--model", "nowhere.models:Net", "--image", "PHOTO"], "cannot import"),
        (["--arch", "resnet18", "--weights", "none.pth", "--image", "PHOTO"], "no such file"),
        (
            ["--arch", "resnet18", "--image", "PHOTO", "--target-layer", "layer5"],
            "Closest names: layer",
        ),
        (["--image", "PHOTO"], "exactly one of --model"),
    ],
)
def test_bad_input_is_one_clear_line(photos, args, message, capsys):
    """In-process (the console script calls main(); one subprocess run is tested below)."""
    from lightning_saliency.cli import main

    paths, broken = photos
    args = [a.replace("PHOTO", paths[0]).replace("BROKEN", broken) for a in args]
    code = main(["explain", "--size", "32", "--methods", "gradcam", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err


def test_a_bad_input_from_the_shell_is_one_line(photos):
    proc = _cli("explain", "--arch", "resnet18", "--image", "missing.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "lightning-saliency: error: no such image: missing.png"
    ]


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
    assert "(default: None)" not in proc.stdout and "``" not in proc.stdout
    assert "(default: 224)" in proc.stdout  # defaults the text does not state are shown


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("lightning-saliency", path=os.path.dirname(sys.executable))
    assert exe, "pip install -e . installs the console script"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "explain" in proc.stdout


# -- bad input, in-process (the console script calls main()): one line, exit 2 ----------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (a decompression-bomb header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "latin1.txt").write_bytes("café\nthé\n".encode("latin-1"))
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))
    (folder / "a_file").write_text("not a directory")
    (folder / "factories.py").write_text(
        "import torch.nn as nn\n"
        "class NeedsArgs(nn.Module):\n"
        "    def __init__(self, depth):\n"
        "        super().__init__()\n"
        "def touching():\n"
        "    open(__file__ + '.called', 'w').close()\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(4, 2))\n"
        "def grey():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),"
        " nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
        "def rgba():\n"
        "    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),"
        " nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    weights = folder / "other.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    return folder


BAD_INPUTS = {
    "--ig-steps abc": (["--arch", "resnet18", "--ig-steps", "abc"], "--ig-steps"),
    "--size 0": (["--arch", "resnet18", "--size", "0"], "--size"),
    "--size -3": (["--arch", "resnet18", "--size", "-3"], "--size"),
    "--out without extension": (["--arch", "resnet18", "--out", "OUT/figure"], "extension"),
    "--out a directory": (["--arch", "resnet18", "--out", "OUT"], "is a directory"),
    "--out unwritable": (["--arch", "resnet18", "--out", "OUT/a_file/f.png"], "not a directory"),
    "Latin-1 labels": (["--arch", "resnet18", "--labels", "OUT/latin1.txt"], "UTF-8"),
    "factory needing arguments": (["--model", "factories:NeedsArgs"], "without arguments"),
    "--std 0": (["--arch", "resnet18", "--std", "0"], "--std must be > 0"),
    "--mean for 2 channels": (["--arch", "resnet18", "--mean", "0.5", "0.5"], "--mean has 2"),
    "decompression bomb": (["--arch", "resnet18", "--image", "OUT/bomb.png"], "too large"),
    "architecture typo": (["--arch", "resnet81"], "did you mean resnet18"),
    "weights that do not fit": (
        ["--arch", "resnet34", "--weights", "OUT/other.pth"],
        "missing keys: layer1.2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_each_bad_input_is_one_line_and_exit_2(case, inputs, photos, capsys, monkeypatch):
    from lightning_saliency.cli import main

    args, message = BAD_INPUTS[case]
    args = [a.replace("OUT", str(inputs)) for a in args]
    if "--image" not in args:
        args += ["--image", photos[0][0]]
    monkeypatch.chdir(inputs)
    base = ["explain", "--methods", "gradcam"] + ([] if "--size" in args else ["--size", "32"])
    code = main(base + args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_a_missing_image_is_reported_before_the_model_loads(inputs, photos, capsys, monkeypatch):
    from lightning_saliency.cli import main

    monkeypatch.chdir(inputs)
    code = main(["explain", "--model", "factories:touching", "--image", photos[0][0],
                 "--image", "gone.png", "--size", "32", "--methods", "gradcam"])  # fmt: skip
    assert code == 2 and "no such image: gone.png" in capsys.readouterr().err
    assert not (inputs / "factories.py.called").exists()


def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    """A 0..65535 ramp reads as 0..1, not 98 % white."""
    import numpy as np

    from lightning_saliency.cli.explain_command import load_images

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))  # square: no pad
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    x = load_images([str(tmp_path / "ramp16.png")], 64, [0.0] * 3, [1.0] * 3)
    assert x.shape == (1, 3, 64, 64)
    assert float((x >= 0.999).float().mean()) < 0.05
    assert float(x.mean()) == pytest.approx(0.5, abs=0.02)


def test_photos_keep_their_aspect_and_rows_their_file_names(tmp_path, photos):
    """A wide photo is resized and padded (zeros: the mean colour), not squashed; the figure
    labels each row with its file name and shows the DFF legend."""
    from lightning_saliency.cli import main
    from lightning_saliency.cli.explain_command import load_images

    wide = tmp_path / "wide.png"
    Image.fromarray((np.ones((20, 80, 3)) * 255).astype(np.uint8)).save(wide)
    x = load_images([str(wide)], 40, [0.0] * 3, [1.0] * 3)
    assert float(x[0, :, 20, :].mean()) == pytest.approx(1.0)  # the photo, in the middle
    assert float(x[0, :, :10].abs().max()) == 0.0  # padding above and below
    out = tmp_path / "figure.png"
    code = main(["explain", "--arch", "resnet18", "--image", photos[0][0], "--image", str(wide),
                 "--size", "48", "--methods", "gradcam,dff", "--out", str(out)])  # fmt: skip
    assert code == 0
    with_rows = np.asarray(Image.open(out))
    code = main(["explain", "--arch", "resnet18", "--image", photos[0][0], "--image", str(wide),
                 "--size", "48", "--methods", "gradcam", "--out", str(out)])  # fmt: skip
    legend = with_rows.shape[0] - np.asarray(Image.open(out)).shape[0]
    assert legend == 4 * 20  # DFF's four concepts, a line each


@pytest.mark.parametrize("factory, channels", [("grey", 1), ("rgba", 4)])
def test_models_with_1_or_4_input_channels(factory, channels, inputs, photos, monkeypatch, capsys):
    from lightning_saliency.cli import main

    monkeypatch.chdir(inputs)
    out = inputs / f"{factory}.png"
    code = main(["explain", "--model", f"factories:{factory}", "--image", photos[0][0],
                 "--size", "32", "--methods", "gradcam,ig", "--ig-steps", "4",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).mode == "RGB"


def test_help_and_argument_errors_import_neither_torch_nor_lightning():
    """Structural, not timed: the parser is stdlib only; the command imports the rest."""
    code = (
        "import sys\n"
        "from lightning_saliency.cli import main\n"
        "for argv in (['explain', '--help'], ['explain', '--layout', 'sideways']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_the_help_names_every_registered_method():
    from lightning_saliency import DEFAULT_METHODS, available_methods
    from lightning_saliency.cli import DEFAULT_METHODS as CLI_DEFAULTS
    from lightning_saliency.cli import METHOD_NAMES

    assert set(METHOD_NAMES) == set(available_methods())
    assert CLI_DEFAULTS == DEFAULT_METHODS


def test_the_demo_ships_in_the_package_and_runs_from_the_command_line(tmp_path):
    """The demo was a file under examples/, which a wheel does not carry: installed users had
    no demo. ``lightning-saliency demo`` runs it (``.ci/package_check`` runs it from a wheel)."""
    result = _cli(
        "demo", "--epochs", "1", "--n-train", "128", "--n-val", "32", "--methods", "gradcam",
        "--num-samples", "4", "--logdir", str(tmp_path / "logs"), cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Alarms raised: " in result.stdout and "Trained 1 epochs" in result.stdout
    assert list((tmp_path / "logs" / "corner").glob("version_0/events.out.tfevents.*"))
    helped = _cli("demo", "--help")
    assert helped.returncode == 0 and "--shortcut" in helped.stdout
    assert "demo" in _cli("--help").stdout
