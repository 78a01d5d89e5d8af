"""The sanity check (cascading model-parameter randomisation) and faithfulness (deletion and
insertion) on a model trained here, in seconds, on the generated shapes; Quantus as referee."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, snapshot, writer_threads
from models import SmallCNN, seeded

from lightning_saliency import explain
from lightning_saliency.demos.classifier import ShapesClassifier
from lightning_saliency.demos.shapes import ShortcutShapes
from lightning_saliency.evaluate.deletion import faithfulness
from lightning_saliency.evaluate.sanity import cascade_depths, randomisation_order, sanity_check


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The demo CNN, 4 epochs on 1000 clean 48-px shapes (about 4 s on 2 cores)."""
    torch.manual_seed(0)
    data = ShortcutShapes(1000, 48, None, seed=0)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    y = data.labels
    model = ShapesClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(4):
        for batch in torch.randperm(len(y), generator=order).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    held_out = ShortcutShapes(64, 48, None, seed=5)
    images = torch.stack([held_out[i]["image"] for i in range(8)])
    accuracy = (model(x[:256]).argmax(1) == y[:256]).float().mean()
    assert accuracy > 0.6, accuracy  # it learnt the shapes
    return model, images, held_out.labels[:8]


def test_guided_backprop_fails_and_gradcam_and_signed_ig_pass(trained):
    model, images, labels = trained
    before = snapshot(model)
    state = torch.get_rng_state()
    report = sanity_check(
        model, images, labels, ("gradcam", "guided_backprop", "integrated_gradients"), ig_steps=16
    )
    assert_same(before, snapshot(model))  # the test randomises a copy
    assert torch.equal(state, torch.get_rng_state())
    assert report.passed == {
        "gradcam": True,
        "guided_backprop": False,
        "integrated_gradients": True,
    }, report.table()
    assert report.similarity("guided_backprop") > 0.55  # a clear margin either side of 0.5
    assert report.similarity("gradcam") < 0.35 and report.similarity("integrated_gradients") < 0.2
    assert [d for d, _ in report.layers] == cascade_depths(len(randomisation_order(model)), 4)
    table = report.table()
    assert "guided_backprop" in table and "fails: not model-sensitive" in table
    figure = report.figure()
    assert len(figure.axes) == 1 + 3 * (len(report.layers) + 1)
    picture = report.picture()  # what the loggers get
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and picture.float().std() > 10


def test_gradcam_deletion_and_insertion_beat_random_maps(trained):
    model, images, labels = trained
    maps = explain(model, images, labels, ("gradcam",))
    before = snapshot(model)
    report = faithfulness(model, images, maps, labels)
    assert_same(before, snapshot(model))
    assert report.beats_random("gradcam"), report.table()
    assert float(report.deletion["gradcam"].mean()) < 0.8 * float(report.random_deletion.mean())
    inverted = {"inverted": -maps["gradcam"]}  # the least relevant pixels first: worse than chance
    worse = faithfulness(model, images, inverted, labels, signed_mass="absolute")
    assert float(worse.deletion["inverted"].mean()) == pytest.approx(
        float(report.deletion["gradcam"].mean()), abs=1e-6
    )  # 'absolute' reads the magnitude, so the order is the same
    flipped = faithfulness(model, images, {"flipped": maps["gradcam"].max() - maps["gradcam"]})
    assert not flipped.beats_random("flipped")


def test_faithfulness_of_one_image_does_not_depend_on_its_batch(trained):
    model, images, labels = trained
    maps = explain(model, images, labels, ("gradcam",))["gradcam"]
    together = faithfulness(model, images, maps, labels, steps=8)
    alone = faithfulness(model, images[3:4], maps[3:4], labels[3:4], steps=8)
    torch.testing.assert_close(alone.deletion["map"][0], together.deletion["map"][3])
    torch.testing.assert_close(alone.random_insertion[0], together.random_insertion[3])


def test_sanity_check_equals_quantus_mprt_on_a_tiny_cnn():
    quantus = pytest.importorskip("quantus")
    model = seeded(SmallCNN()).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2, 3])

    def explain_func(model, inputs, targets, **_):
        out = explain(model, torch.as_tensor(inputs), torch.as_tensor(targets), ("gradcam",))
        return out["gradcam"][:, None].detach().numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)(
            model=copy.deepcopy(model),
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=None,
            explain_func=explain_func,
            channel_first=True,
        )
    report = sanity_check(model, images, targets, ("gradcam",), depths=None, seed=42)
    layers = [name for name in scores if name != "original"]
    assert layers == [name for _, name in report.layers]
    theirs = np.array([scores[name] for name in layers], dtype=np.float64)
    ours = report.spearman_abs["gradcam"].numpy()
    dead = np.isnan(theirs)  # a map constant everywhere (dead Grad-CAM): no ordering left
    np.testing.assert_allclose(ours[~dead], theirs[~dead], atol=1e-4)
    assert (ours[dead] == 0).all()  # we count it as no similarity, Quantus as NaN
    assert np.nanstd(theirs) > 0.05 and (~dead).sum() > 8  # the comparison can fail


# -- in the callback: once, logged, and gating the alarms ----------------------------------------
def _input_only(session, _options):
    """A 'method' that shows the input and ignores the model: the image's brightness."""
    return session.images.abs().sum(1)


@pytest.mark.parametrize("gate", [True, False])
def test_the_callback_logs_the_check_once_and_gates_a_method_that_ignores_the_model(tmp_path, gate):
    from dataclasses import replace

    import lightning as L
    from helpers import read_events, tiny_datamodule, tiny_model, trainer

    from lightning_saliency import SaliencyCallback
    from lightning_saliency.engine.methods import METHODS, register, unregister

    register(replace(METHODS["saliency"], name="input_only", compute=_input_only, aliases=()))
    try:
        images = torch.rand(6, 3, 32, 32) * 0.1
        images[:, :, :6, :6] = 3.0  # every image bright in its top-left corner
        callback = SaliencyCallback(
            methods=("gradcam", "input_only"),
            samples=images,
            labels=[0, 1, 2, 3, 0, 1],
            target="pred",
            sanity_gate=gate,
        )
        L.seed_everything(0)
        trainer(str(tmp_path), [callback], max_epochs=2, limit_train_batches=2).fit(
            tiny_model(), tiny_datamodule()
        )
        assert callback.sanity is not None and callback.sanity.passed["input_only"] is False
        assert callback.sanity.similarity("input_only") == pytest.approx(1.0)
    finally:
        unregister("input_only")
    assert callback.faithfulness is not None and "input_only" in callback.faithfulness.deletion
    events = read_events(str(tmp_path / "run"))
    texts = events.Tensors("saliency/sanity/text_summary")
    assert len(texts) == 1  # once per fit
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "`input_only`" in table and "fails: not model-sensitive" in table
    assert "Faithfulness" in table
    assert len(events.Images("saliency/sanity")) == 1
    alarmed = {m for m, _ in callback.monitor.raised} | {e.method for e in callback.alarms}
    alarm_text = " ".join(
        t.tensor_proto.string_val[0].decode()
        for t in events.Tensors("saliency_alarms/alarms/text_summary")
    )
    if gate:
        assert "input_only" not in alarmed  # its corner is the input's, not the model's
        assert "input_only is not model-sensitive" in alarm_text
        assert "its alarms are left out" in alarm_text
        assert events.Scalars("saliency/input_only/corner_enrichment")  # scores still logged
    else:
        assert "input_only" in alarmed
        assert "it still raises alarms" in alarm_text


def test_check_sanity_on_demand_explains_once_and_logs(tmp_path, monkeypatch):
    import lightning as L
    from helpers import read_events, tiny_datamodule, tiny_model, trainer

    from lightning_saliency import SaliencyCallback, SaliencyConfigError

    callback = SaliencyCallback(methods=("gradcam", "integrated_gradients"), ig_steps=4,
                                sanity_check=False)  # fmt: skip
    with pytest.raises(SaliencyConfigError, match="on_validation_end or later"):
        callback.check_sanity(None, tiny_model())
    L.seed_everything(0)
    model = tiny_model()
    tr = trainer(str(tmp_path), [callback], max_epochs=1, limit_train_batches=2)
    tr.fit(model, tiny_datamodule())
    assert callback.sanity is None  # sanity_check=False: not run by the fit
    import importlib

    calls = []
    for name in ("lightning_saliency.callback.explainer", "lightning_saliency.evaluate.sanity"):
        module = importlib.import_module(name)
        real = module.explain

        def counted(*args, real=real, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "explain", counted)
    report = callback.check_sanity(tr, model)
    # the maps of now once, shared by both tests, then one per randomised depth
    assert len(calls) == 1 + len(report.layers)
    assert report is callback.sanity and sorted(report.methods) == [
        "gradcam",
        "integrated_gradients",
    ]
    assert callback.faithfulness is not None
    # after the fit, on demand: written before check_sanity returns, and no writer thread left
    assert not writer_threads()
    events = read_events(str(tmp_path / "run"))
    assert len(events.Tensors("saliency/sanity/text_summary")) == 1
    assert len(events.Images("saliency/sanity")) == 1
