"""The registry is the only place a method lives: a method registered from a test module, and
every declared option of every method, reach it from explain(), the callback, the command line
and YAML (a real LightningCLI), with no edit anywhere else."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import pytest
import torch
import yaml
from helpers import read_events, tiny_datamodule, tiny_model, trainer
from PIL import Image

from lightning_saliency import SaliencyCallback, SaliencyConfigError, available_options, explain
from lightning_saliency.cli import main as cli_main
from lightning_saliency.engine.methods import (
    METHODS,
    MethodOptions,
    cam_method,
    register,
    unregister,
)


@dataclass(frozen=True)
class ToyOptions(MethodOptions):
    """Options of the toy CAM.

    Attributes:
        power: the gradient weights are raised to this power.
    """

    power: int = 1


def _toy_weights(session, options: ToyOptions) -> torch.Tensor:
    return session.layer_gradients().abs().mean(dim=(2, 3)) ** options.power


@pytest.fixture
def toycam():
    """A CAM variant defined here, registered through the registry alone."""
    spec = cam_method(
        "toycam",
        _toy_weights,
        "Toy CAM: mean absolute gradient per channel, to a power (a test's own method).",
        options=ToyOptions,
    )
    yield spec
    unregister("toycam")


# -- spies: every method's compute replaced by one that records its options --------------------
def _non_default(hint: Any, default: Any) -> Any:
    """A valid value of ``hint`` other than ``default``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return next(c for c in hint.__args__ if c != default)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        for arg in args:  # prefer the kind the default has
            if isinstance(default, arg if isinstance(arg, type) else ()):
                return _non_default(arg, default)
        return _non_default(args[0], None)
    if hint is bool:
        return not default
    if hint is int:
        return 3 if default is None else default + 1
    if hint is float:
        return 0.25 if not default else default / 2
    if hint is str:
        return "riemann_trapezoid"
    raise AssertionError(f"no test value for {hint}")


def expected_options() -> dict[str, dict[str, Any]]:
    """method -> option -> a non-default value, for every declared option of every method."""
    table = {}
    for name, method in METHODS.items():
        hints = typing.get_type_hints(method.options)
        table[name] = {
            f.name: _non_default(hints[f.name], f.default)
            for f in dataclasses.fields(method.options)
        }
    return table


@pytest.fixture
def spies(monkeypatch):
    """Replace every method's compute by a spy that records the options it receives."""
    seen: dict[str, Any] = {}

    def spy_for(name):
        def compute(session, options):
            seen[name] = options
            n, _, h, w = session.images.shape
            if METHODS[name].kind == "concepts":
                return torch.rand(n, 2, h, w)
            return torch.rand(n, h, w)

        return compute

    for name, method in list(METHODS.items()):
        monkeypatch.setitem(METHODS, name, dataclasses.replace(method, compute=spy_for(name)))
    return seen


def _assert_received(seen: dict[str, Any], expected: dict[str, dict[str, Any]]) -> None:
    assert set(seen) == set(expected), sorted(set(expected) - set(seen))
    for method, options in expected.items():
        for option, value in options.items():
            assert getattr(seen[method], option) == value, (method, option)


# -- the four entry points -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return str(path)


def _cli(tmp_path, photo, methods, options):
    args = ["explain", "--arch", "resnet18", "--image", photo, "--size", "32"]
    args += ["--methods", ",".join(methods), "--out", str(tmp_path / "figure.png")]
    for method, values in options.items():
        for option, value in values.items():
            args += ["--method-option", f"{method}.{option}={value}"]
    assert cli_main(args) == 0
    return Image.open(tmp_path / "figure.png")


YAML = """
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: LOGS}
data: {n_train: 32, n_val: 16, size: 32, batch_size: 16}
model: {width: 8}
"""


def _yaml_fit(tmp_path, callback_args):
    from lightning.pytorch.cli import LightningCLI

    from lightning_saliency.demos import ShortcutDataModule
    from lightning_saliency.demos.classifier import ShapesClassifier

    config = yaml.safe_load(YAML.replace("LOGS", str(tmp_path / "logs")))
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_saliency.SaliencyCallback", "init_args": callback_args}
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    L.seed_everything(0)
    LightningCLI(ShapesClassifier, ShortcutDataModule, args=["fit", "--config", str(path)])
    return read_events(str(tmp_path / "logs"))


def _callback_fit(tmp_path, **kwargs):
    L.seed_everything(0)
    callback = SaliencyCallback(num_samples=4, **kwargs)
    trainer(str(tmp_path), [callback], max_epochs=1).fit(tiny_model(), tiny_datamodule())
    return callback, read_events(str(tmp_path))


# -- a method registered in a test module works everywhere --------------------------------------
def test_toy_cam_works_in_explain(toycam, images):
    model = tiny_model().eval()
    plain = explain(model, images, methods=("toycam", "gradcam"))
    squared = explain(model, images, methods=("toycam",), method_options={"toycam": {"power": 2}})
    assert plain["toycam"].shape == (4, 32, 32) and plain["toycam"].min() >= 0
    assert not torch.allclose(plain["toycam"], squared["toycam"])  # the option reaches it
    assert "toycam" in available_options() and available_options()["toycam"] == {"power": 1}


def test_toy_cam_works_in_the_callback(toycam, tmp_path):
    callback, events = _callback_fit(
        tmp_path, methods=("toycam",), method_options={"toycam": {"power": 2}}
    )
    assert "saliency/toycam" in events.Tags()["images"]
    assert "saliency/toycam/corner_enrichment" in events.Tags()["scalars"]
    assert "toycam" in callback.history[-1].means


def test_toy_cam_works_on_the_command_line(toycam, tmp_path, photo):
    figure = _cli(tmp_path, photo, ["toycam"], {"toycam": {"power": 2}})
    assert figure.width > 2 * 32  # the input and the toy's column


@pytest.mark.slow
def test_toy_cam_works_from_yaml(toycam, tmp_path):
    events = _yaml_fit(
        tmp_path, {"methods": ["toycam"], "method_options": {"toycam": {"power": 2}}}
    )
    assert "saliency/toycam" in events.Tags()["images"]


# -- every declared option of every method reaches it from each entry point ----------------------
def test_every_option_reaches_its_method_from_explain(spies, images):
    expected = expected_options()
    explain(tiny_model().eval(), images, methods=list(expected), method_options=expected)
    _assert_received(spies, expected)


def test_every_option_reaches_its_method_from_the_callback(spies, tmp_path):
    expected = expected_options()
    _callback_fit(tmp_path, methods=list(expected), method_options=expected)
    _assert_received(spies, expected)


def test_every_option_reaches_its_method_from_the_command_line(spies, tmp_path, photo):
    expected = expected_options()
    _cli(tmp_path, photo, list(expected), expected)
    _assert_received(spies, expected)


@pytest.mark.slow
def test_every_option_reaches_its_method_from_yaml(spies, tmp_path):
    expected = expected_options()
    _yaml_fit(tmp_path, {"methods": list(expected), "method_options": expected, "num_samples": 4})
    _assert_received(spies, expected)


def test_first_class_arguments_set_the_same_options(spies, images):
    model = tiny_model().eval()
    explain(model, images, methods=("ig", "dff"), ig_steps="auto", dff_components=2)
    assert spies["integrated_gradients"].steps == "auto" and spies["dff"].components == 2
    callback = SaliencyCallback(methods=("ig", "dff"), ig_steps=8, dff_components=3)
    assert callback.method_options["integrated_gradients"].steps == 8
    assert callback.method_options["dff"].components == 3


def test_flat_options_of_0_1_still_work_with_a_warning_naming_the_new_spelling(spies, images):
    model = tiny_model().eval()
    with pytest.warns(FutureWarning, match=r"method_options=\{'smoothgrad': \{'samples'"):
        explain(model, images, methods=("smoothgrad",), nt_samples=3)
    assert spies["smoothgrad"].samples == 3
    with pytest.warns(FutureWarning, match="'occlusion': {'window'"):
        explain(model, images, methods=("occlusion",), occlusion_window=5)
    assert spies["occlusion"].window == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method_options": {"smoothgrad": {"samples": 4}}}, "not among methods"),
        ({"method_options": {"ig": {"stepz": 4}}}, "has no option 'stepz'"),
        ({"method_options": {"ig": {"steps": "fast"}}}, r"\['steps'\] must be int or 'auto'"),
        ({"method_options": {"ig": {"steps": 0}}}, "steps must be a positive int"),
        ({"method_options": {"dff": {"components": 2.5}}}, r"\['components'\] must be int"),
        ({"ig_steps": 16, "method_options": {"ig": {"steps": 8}}}, "set twice"),
        ({"method_options": {"lime": {}}}, "unknown saliency method 'lime'"),
    ],
)
def test_bad_options_are_refused_at_construction_naming_the_option(kwargs, message):
    with pytest.raises(SaliencyConfigError, match=message):
        SaliencyCallback(methods=("gradcam", "ig", "dff"), **kwargs)


@pytest.mark.parametrize("name", ["ig_stepz", "ig_steps_start"])
def test_unknown_flat_option_is_refused(images, name):
    """ig_steps_start was an internal channel of 0.1 exposed as an option; it is gone."""
    with pytest.raises(SaliencyConfigError, match=f"unknown option '{name}'"):
        explain(tiny_model(), images, methods=("gradcam", "ig"), **{name: 3})


def test_a_method_without_a_dataclass_for_options_is_refused():
    with pytest.raises(TypeError, match="MethodOptions dataclass"):
        register(dataclasses.replace(METHODS["gradcam"], name="broken", options=dict))


def test_the_readme_example_of_adding_a_method_works(images, tmp_path, monkeypatch):
    """The methods page's "Adding a method" snippet, run as written."""
    from pathlib import Path

    from helpers import options_table

    page = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    section = page[page.index("## Adding a method") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", 10)]
    (tmp_path / "powercam_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("powercam_example")
        out = explain(tiny_model().eval(), images, methods=("powercam",))
        assert out["powercam"].shape == (4, 32, 32)
        assert options_table().option_docs(METHODS["powercam"]) == {
            "power": "the gradient weights are raised to this power."
        }
        SaliencyCallback(methods=["gradcam", "powercam"], method_options={"powercam": {"power": 2}})
    finally:
        unregister("powercam")
        sys.modules.pop("powercam_example", None)
