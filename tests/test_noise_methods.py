"""The noise methods as the literature names them, each equal to captum on the same noise, and
every method's map independent of the batch it is computed in."""

import warnings

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from models import SmallCNN, seeded, small_model_for

from lightning_saliency import available_methods, explain
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.engine.methods import smoothgrad as noise_methods

TARGETS = [0, 1, 2, 3]


def captum_with_our_noise(monkeypatch, method, images, samples, noise, **kwargs):
    """captum's NoiseTunnel handed the noise our methods draw: copy s of image i gets
    ``shared_noise[s] * noise * range(image i)`` (captum repeats each image ``samples`` times,
    image-major, and adds ``torch.normal``'s draw)."""
    stack = noise_methods.shared_noise(tuple(images.shape[1:]), samples, seed=0)
    scale = noise_methods.noise_scale(images, noise)
    drawn = (stack[None] * scale[:, None, None, None, None]).reshape(-1, *images.shape[1:])
    monkeypatch.setattr(torch, "normal", lambda mean, std: drawn.clone())
    return NoiseTunnel(method).attribute(
        images,
        nt_samples=samples,
        nt_samples_batch_size=samples,
        stdevs=1.0,
        target=torch.tensor(TARGETS),
        **kwargs,
    )


@pytest.mark.parametrize("name", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_gradient_noise_methods_equal_captum_on_the_same_noise(monkeypatch, images, name):
    model = seeded(SmallCNN()).eval()
    options = {name: {"samples": 5, "noise": 0.2}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ours = explain(model, images, TARGETS, methods=(name,), method_options=options)[name]
    ref = captum_with_our_noise(
        monkeypatch, Saliency(model), images, 5, 0.2, nt_type=name, abs=False
    ).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert (ours < 0).any() == (METHODS[name].sign == "signed")  # a sign fixed by the name


def test_ig_smoothgrad_sq_is_the_former_smoothgrad_and_equals_captum(monkeypatch, images):
    model = seeded(SmallCNN()).eval()
    options = {"ig_smoothgrad_sq": {"samples": 3, "ig_steps": 6}}
    ours = explain(model, images, TARGETS, methods=("noise_tunnel",), method_options=options)
    ref = captum_with_our_noise(
        monkeypatch,
        IntegratedGradients(model),
        images,
        3,
        0.1,
        nt_type="smoothgrad_sq",
        n_steps=6,
    ).sum(1)
    torch.testing.assert_close(ours["ig_smoothgrad_sq"], ref, rtol=1e-4, atol=1e-7)


def test_smoothgrad_says_once_that_its_meaning_changed(images, monkeypatch):
    monkeypatch.setattr(noise_methods, "_said_renamed", [])
    model = seeded(SmallCNN()).eval()
    options = {"smoothgrad": {"samples": 2}}
    with pytest.warns(FutureWarning, match="now 'ig_smoothgrad_sq'"):
        explain(model, images, methods=("smoothgrad",), method_options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        explain(model, images, methods=("smoothgrad",), method_options=options)


def test_the_old_flat_noise_options_map_to_the_new_methods(images):
    model = seeded(SmallCNN()).eval()
    with pytest.warns(FutureWarning, match="method_options"):
        out = explain(model, images, methods=("ig_smoothgrad_sq",), nt_samples=2, nt_ig_steps=3)
    reference = explain(
        model,
        images,
        methods=("ig_smoothgrad_sq",),
        method_options={"ig_smoothgrad_sq": {"samples": 2, "ig_steps": 3}},
    )
    torch.testing.assert_close(out["ig_smoothgrad_sq"], reference["ig_smoothgrad_sq"])


def test_nt_type_is_gone_and_says_which_method_to_choose(images):
    from lightning_saliency import SaliencyConfigError

    model = seeded(SmallCNN()).eval()
    with pytest.raises(SaliencyConfigError, match=r"nt_type is gone.*'smoothgrad_sq'"):
        explain(model, images, methods=("smoothgrad",), nt_type="vargrad")


def test_noise_leaves_the_global_rng_alone_and_repeats(images):
    model = seeded(SmallCNN()).eval()
    state = torch.get_rng_state()
    first = explain(model, images, methods=("vargrad",), method_options={"vargrad": {"samples": 3}})
    assert torch.equal(state, torch.get_rng_state())
    again = explain(model, images, methods=("vargrad",), method_options={"vargrad": {"samples": 3}})
    torch.testing.assert_close(first["vargrad"], again["vargrad"])
    other = explain(
        model, images, methods=("vargrad",), method_options={"vargrad": {"samples": 3}}, seed=1
    )
    assert not torch.allclose(first["vargrad"], other["vargrad"])


FEW = {
    "smoothgrad": {"samples": 3},
    "smoothgrad_sq": {"samples": 3},
    "vargrad": {"samples": 3},
    "ig_smoothgrad_sq": {"samples": 2, "ig_steps": 4},
    "integrated_gradients": {"steps": "auto"},
}


@pytest.mark.parametrize("name", sorted(m for m in available_methods() if METHODS[m].kind == "map"))
def test_a_map_does_not_depend_on_the_other_images_in_its_batch(name):
    """Bug: smoothgrad's noise was drawn for the whole batch, so the same image alone and in
    a batch of 8 had maps at Spearman 0.83. DFF is the exception by design (its concepts are
    factorised jointly over the samples), so it is not here."""
    model = seeded(small_model_for(name)).eval()
    batch = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch[5] *= 4  # a neighbour with another value range
    options = {name: FEW[name]} if name in FEW else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = explain(model, batch, methods=(name,), method_options=options)[name]
        alone = explain(model, batch[2:3], methods=(name,), method_options=options)[name]
    torch.testing.assert_close(alone[0], together[2], rtol=1e-4, atol=1e-6)
