"""The attention methods against their references, on every attention implementation.

- Rollout against jacobgil's ``vit-explain`` and gradient-weighted attention against Chefer et
  al.'s code: both were run once from a snapshot of their repositories on a small timm ViT
  (``fixtures/make_attention_references.py``; the maps, the weights and the commits are in
  ``fixtures/attention_references.pt``).
- Chefer et al.'s CVPR 2021 transformer attribution against their ``ViT_LRP`` code, the same way.
- LeGrad against torchcam 0.5.0 on torchvision's ``vit_b_16``.
- Rollout's row normalisation (where ``vit-explain`` divides columns) by hand on two blocks of
  two heads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from fixtures.make_attention_references import tiny_vit
from helpers import assert_same, snapshot
from torch import nn
from torchvision.models import VisionTransformer

from lightning_saliency import METHODS, SaliencyConfigError, explain, register_attention
from lightning_saliency.engine.attention import ADAPTERS, attention_pass
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import upsample
from lightning_saliency.engine.methods.attention_maps import discard_lowest, fuse_heads, rollout
from lightning_saliency.evaluate.monitor import ScoreMonitor

FIXTURE = torch.load(
    Path(__file__).parent / "fixtures" / "attention_references.pt", weights_only=False
)
ATTENTION = ("attention_rollout", "generic_attention", "legrad", "transformer_lrp")
"""The attention methods that read any attention (transformer_attribution: plain ViTs with a
linear head on the class token)."""


def reference_model() -> nn.Module:
    model = tiny_vit()
    model.load_state_dict(FIXTURE["state_dict"])
    return model


def per_image_max(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).amax(1)[:, None, None]


def tv_vit(**kwargs: int) -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5, **kwargs)  # fmt: skip
    for name, param in model.named_parameters():
        if param.dim() > 1 or "token" in name or "pos_embedding" in name:
            nn.init.normal_(param, std=0.3)
    return model.eval()


def timm_vit(name: str = "vit_tiny_patch16_224", **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, **kwargs)  # fmt: skip
    for pname, param in model.named_parameters():
        if param.dim() > 1 or "token" in pname or "pos_embed" in pname:
            nn.init.normal_(param, std=0.3)
    return model.eval()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


# -- references ----------------------------------------------------------------------------------
def test_rollout_equals_vit_explain_where_the_definitions_agree():
    options = {"attention_rollout": {"head_fusion": "mean", "discard_ratio": 0.0}}
    ours = explain(reference_model(), FIXTURE["images"], methods=("rollout",),
                   method_options=options)["attention_rollout"]  # fmt: skip
    theirs = upsample(FIXTURE["rollout"]["mean_0.0"].float(), (32, 32))
    assert torch.allclose(per_image_max(ours), per_image_max(theirs), atol=1e-5)


def test_rollout_fuses_and_discards_as_vit_explain_for_every_option():
    """With ``vit-explain``'s own normalisation (columns divided by row sums) replayed, every
    head fusion and discard ratio gives its maps exactly: the fusion, the discarding and the
    readout are the same; only the normalisation differs, as the module says."""
    found = attention_pass(reference_model(), FIXTURE["images"])
    for key, theirs in FIXTURE["rollout"].items():
        fusion, ratio = key.split("_")
        eye = torch.eye(17)
        result = eye.expand(3, -1, -1)
        for probs in found.probabilities:
            mixed = (discard_lowest(fuse_heads(probs.detach(), fusion), float(ratio)) + eye) / 2
            result = mixed / mixed.sum(-1)[:, None, :] @ result
        ours = per_image_max(found.read_row(result))
        assert torch.allclose(ours, theirs.float(), atol=1e-6), key
        if key != "mean_0.0":  # where rows do not sum to one, the definitions part
            rows = rollout(found.probabilities, fusion, float(ratio))
            assert not torch.allclose(per_image_max(found.read_row(rows)), ours, atol=1e-3)


def test_rollout_by_hand_on_two_blocks_of_two_heads():
    first = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
                          [[0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]]])  # fmt: skip
    second = torch.tensor([[[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]],
                           [[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.3, 0.4, 0.3]]])  # fmt: skip
    expected = torch.eye(3)
    for block in (first, second):
        fused = [[max(block[0, i, j], block[1, i, j]) for j in range(3)] for i in range(3)]
        mixed = [[(fused[i][j] + (i == j)) / 2 for j in range(3)] for i in range(3)]
        mixed = [[v / sum(row) for v in row] for row in mixed]
        expected = torch.tensor(mixed) @ expected
    got = rollout([first[None], second[None]], "max", 0.0)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3))  # rows of probabilities stay rows


@pytest.mark.parametrize("which", ["predicted", "next"])
def test_generic_attention_equals_chefers(which):
    generic = FIXTURE["generic"]
    out = explain(reference_model(), FIXTURE["images"], generic[f"{which}_targets"],
                  methods=("generic_attention",))  # fmt: skip
    theirs = upsample(generic[which].reshape(3, 4, 4).float(), (32, 32))
    assert torch.allclose(out["generic_attention"], theirs, atol=1e-5)


@pytest.mark.parametrize("which", ["predicted", "next"])
@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_equals_chefers_cvpr_code(which, start_layer):
    attribution = FIXTURE["attribution"]
    options = {"transformer_attribution": {"start_layer": start_layer}}
    out = explain(reference_model(), FIXTURE["images"], attribution[f"{which}_targets"],
                  methods=("transformer_attribution",), method_options=options)  # fmt: skip
    theirs = attribution[f"{which}_start{start_layer}"].reshape(3, 4, 4).float()
    assert torch.allclose(out["transformer_attribution"], upsample(theirs, (32, 32)), atol=1e-6)


def torchvision_copy(model: nn.Module) -> VisionTransformer:
    """torchvision's ViT with the fixture's timm weights (the same network, another
    implementation: nn.MultiheadAttention instead of timm's fused Attention)."""
    twin = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128,
                             num_classes=5).eval()  # fmt: skip
    timm_state = model.state_dict()
    state = {
        "class_token": timm_state["cls_token"],
        "conv_proj.weight": timm_state["patch_embed.proj.weight"],
        "conv_proj.bias": timm_state["patch_embed.proj.bias"],
        "encoder.pos_embedding": timm_state["pos_embed"],
        "encoder.ln.weight": timm_state["norm.weight"],
        "encoder.ln.bias": timm_state["norm.bias"],
        "heads.head.weight": timm_state["head.weight"],
        "heads.head.bias": timm_state["head.bias"],
    }
    names = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv": "self_attention.in_proj",
        "attn.proj": "self_attention.out_proj",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.3",
    }
    for key, value in timm_state.items():
        for theirs, ours in names.items():
            if key.startswith("blocks.") and f".{theirs}." in key:
                index, rest = key.split(".")[1], key.split(f".{theirs}.")[1]
                joined = "_" if ours.startswith("self_attention.in_proj") else "."
                state[f"encoder.layers.encoder_layer_{index}.{ours}{joined}{rest}"] = value
    twin.load_state_dict(state)
    return twin


def test_torchvision_and_timm_give_the_same_maps_of_the_same_network():
    """The fixture's weights in torchvision's ViT: nn.MultiheadAttention, replayed from its
    weights, reads as timm's explicit attention, so every method that reads attention gives
    the authors' maps through either implementation."""
    timm_model = reference_model()
    twin = torchvision_copy(timm_model)
    images = FIXTURE["images"]
    assert torch.allclose(twin(images), timm_model(images), atol=1e-5)
    methods = ("attention_rollout", "generic_attention", "transformer_attribution",
               "transformer_lrp")  # fmt: skip
    a, b = explain(timm_model, images, methods=methods), explain(twin, images, methods=methods)
    for method in methods:
        scale = float(a[method].abs().max())
        assert torch.allclose(a[method], b[method], atol=1e-4 * scale), method


def test_transformer_attribution_refuses_what_its_rules_do_not_cover():
    distilled = timm_vit("deit_tiny_distilled_patch16_224")
    with pytest.raises(SaliencyConfigError, match="linear head on the class token"):
        explain(distilled, IMAGES, methods=("transformer_attribution",))
    scaled = timm_vit(init_values=0.1)  # layer scale: no rule of the authors' covers it
    with pytest.raises(SaliencyConfigError, match="plain ViT blocks"):
        explain(scaled, IMAGES, methods=("transformer_attribution",))
    with pytest.raises(SaliencyConfigError, match="start_layer"):
        explain(tv_vit(), IMAGES, methods=("transformer_attribution",),
                method_options={"transformer_attribution": {"start_layer": 2}})  # fmt: skip


def test_legrad_equals_torchcam_on_vit_b_16():
    from torchcam.methods import LeGrad

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=64, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for blocks in (4, None):
        ours = explain(model, images, methods=("legrad",),
                       method_options={"legrad": {"blocks": blocks}})  # fmt: skip
        layers = list(model.encoder.layers)[-(blocks or 12) :]
        with LeGrad(model, layers) as extractor:
            theirs = extractor(ours.targets.tolist(), model(images), normalized=False)[0]
        theirs = upsample(theirs.detach(), (64, 64))
        assert torch.allclose(ours["legrad"], theirs, rtol=1e-4, atol=1e-7), blocks


# -- every implementation, one image at a time ---------------------------------------------------
class OwnAttention(nn.Module):
    """A user's attention: explicit softmax, its probabilities through ``self.probs``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.probs = nn.Identity()
        self.fast = True  # a switch the adapter turns off, as timm's fused_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.fast:
            mixed = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            mixed = self.probs((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)) @ v
        return self.proj(mixed.transpose(1, 2).reshape(n, t, c))


class OwnBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), OwnAttention(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class OwnViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.Sequential(OwnBlock(16), OwnBlock(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))
        return self.head(tokens[:, 0])


@pytest.fixture
def own_attention():
    register_attention(OwnAttention, "probs", {"fast": False})
    yield
    ADAPTERS.pop(f"{OwnAttention.__module__}.{OwnAttention.__qualname__}", None)


def implementations() -> dict[str, tuple[nn.Module, int, str]]:
    """name -> (model, prefix tokens, readout)."""
    return {
        "torchvision": (tv_vit(), 1, "class_token"),
        "timm": (timm_vit(), 1, "class_token"),
        "timm_distilled": (timm_vit("deit_tiny_distilled_patch16_224"), 2, "class_token"),
        "timm_registers_pooled": (
            timm_vit("vit_little_patch16_reg4_gap_256", mlp_ratio=2.0),
            4,
            "mean",
        ),
    }


@pytest.mark.parametrize("name", ["torchvision", "timm", "timm_distilled", "timm_registers_pooled"])
def test_every_implementation_batch_independent_and_put_back(name):
    model, prefix, readout = implementations()[name]
    found = attention_pass(model, IMAGES)
    assert (found.reading.prefix, found.reading.grid, found.readout) == (prefix, (4, 4), readout)
    methods = ATTENTION + (("transformer_attribution",) if readout == "class_token" else ())
    if name == "timm_distilled":  # two heads averaged: no single linear head to start from
        methods = ATTENTION
    before = snapshot(model)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    together = explain(model, IMAGES, methods=methods)
    assert_same(before, snapshot(model))
    assert fused == [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    for i in range(len(IMAGES)):
        alone = explain(model, IMAGES[i : i + 1], together.targets[i : i + 1], methods)
        for method in methods:
            scale = float(together[method][i].abs().max())
            assert scale > 0, (method, "a zero map")
            assert torch.allclose(alone[method][0], together[method][i], atol=1e-5 * scale)


def test_a_users_attention_is_read_through_its_adapter(own_attention):
    torch.manual_seed(0)
    model = OwnViT().eval()
    found = attention_pass(model, IMAGES)
    assert len(found.probabilities) == 2 and found.reading.prefix == 1
    assert all(block.attn.fast for block in model.blocks)  # the switch is back
    out = explain(model, IMAGES, methods=("attention_rollout", "generic_attention"))
    expected = rollout(found.probabilities, "mean", 0.9)
    assert torch.allclose(out["attention_rollout"], upsample(found.read_row(expected), (32, 32)))


def test_the_model_is_put_back_after_an_error_inside_the_pass():
    model = timm_vit()

    def fail(*_args: object) -> None:
        raise RuntimeError("the forward fails in block 1")

    handle = model.blocks[1].register_forward_pre_hook(fail)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="block 1"):
        explain(model, IMAGES, methods=ATTENTION)
    handle.remove()
    after = snapshot(model)
    before["hooks"] -= 1
    assert_same(before, after)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


# -- what the maps mean --------------------------------------------------------------------------
def test_rollout_is_the_same_map_for_every_target_and_never_alarms():
    model = tv_vit()
    maps = {t: explain(model, IMAGES, t, methods=ATTENTION) for t in range(5)}
    for t in range(1, 5):
        assert torch.equal(maps[t]["attention_rollout"], maps[0]["attention_rollout"])
        assert not torch.allclose(maps[t]["generic_attention"], maps[0]["generic_attention"])
        assert not torch.allclose(maps[t]["legrad"], maps[0]["legrad"])
    assert not METHODS["attention_rollout"].class_specific
    assert METHODS["generic_attention"].class_specific and METHODS["legrad"].class_specific


def test_where_attention_maps_point_is_logged_never_alarmed():
    """The same corner-piled maps: Grad-CAM's raise the corner and consensus alarms;
    EigenCAM's and rollout's (class-agnostic) and gradient-weighted attention's (it marks where
    attention rests, sinks included) are scored and shown, and raise none."""
    corner = torch.zeros(4, 32, 32)
    corner[:, :4, :4] = 1.0
    labels = torch.tensor([0, 0, 1, 1])
    maps = {m: corner for m in ("gradcam", "eigencam", "attention_rollout", "generic_attention")}
    report = ScoreMonitor().observe(0, Explanations(maps, torch.eye(2)[labels] * 5, labels), labels)
    raised = {(e.method, e.score) for e in report.events}
    assert raised == {("gradcam", "corner_enrichment"), ("gradcam", "consensus")}
    for method in maps:
        assert report.metrics[f"saliency/{method}/corner_enrichment"] > 4.8
    assert not METHODS["generic_attention"].location_alarms and METHODS["gradcam"].location_alarms


# -- what they refuse, at setup ------------------------------------------------------------------
def test_a_transformer_without_a_sound_definition_is_an_error_that_names_the_fix(own_attention):
    swin = torchvision.models.swin_t(num_classes=3).eval()
    with pytest.raises(SaliencyConfigError, match="attends within windows.*CAM method"):
        explain(swin, torch.rand(1, 3, 64, 64), methods=("attention_rollout",))
    mobilevit = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=3).eval()
    with pytest.raises(SaliencyConfigError, match="batch is not the images'"):
        explain(mobilevit, torch.rand(1, 3, 64, 64), methods=("legrad",))
    cnn = torchvision.models.resnet18(num_classes=3).eval()
    with pytest.raises(SaliencyConfigError, match="no attention module.*CAM method"):
        explain(cnn, torch.rand(1, 3, 64, 64), methods=("generic_attention",))
    ADAPTERS.pop(f"{OwnAttention.__module__}.{OwnAttention.__qualname__}")
    with pytest.raises(SaliencyConfigError, match=r"register_attention\(OwnAttention"):
        explain(OwnViT().eval(), IMAGES, methods=("attention_rollout",))


def test_multihead_attention_called_with_a_mask_is_refused():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            mask = torch.zeros(t.shape[1], t.shape[1], dtype=torch.bool)
            return self.head(self.attention(t, t, t, attn_mask=mask)[0].mean(1))

    with pytest.raises(SaliencyConfigError, match="has a mask"):
        explain(Masked().eval(), IMAGES, methods=("attention_rollout",))


def test_legrad_needs_class_targets_and_a_known_head():
    with pytest.raises(SaliencyConfigError, match="needs class targets"):
        explain(tv_vit(), IMAGES, lambda out: out[:, 0], methods=("legrad",))
    with pytest.raises(SaliencyConfigError, match="final norm and head"):
        register_attention(OwnAttention, "probs", {"fast": False})
        try:
            explain(OwnViT().eval(), IMAGES, methods=("legrad",))
        finally:
            ADAPTERS.pop(f"{OwnAttention.__module__}.{OwnAttention.__qualname__}")


# -- under the trainer: bf16-mixed and DDP -------------------------------------------------------
@pytest.mark.slow
def test_attention_methods_under_bf16_mixed_give_finite_scores(tmp_path):
    import ddp_vit_script
    from helpers import read_events, tiny_datamodule, trainer

    from lightning_saliency import SaliencyCallback

    callback = SaliencyCallback(num_samples=4, methods=ddp_vit_script.METHODS)
    trainer(str(tmp_path), [callback], max_epochs=1, precision="bf16-mixed").fit(
        ddp_vit_script.ViTClassifier(), tiny_datamodule()
    )
    assert not callback.switched_off
    tags = set(read_events(str(tmp_path)).Tags()["images"])
    assert {f"saliency/{m}" for m in ATTENTION} <= tags
    for method in ATTENTION:
        values = callback.history[-1].means[method].values()
        assert values and all(v == v for v in values), method


@pytest.mark.slow
def test_attention_methods_under_ddp_on_two_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "ddp_vit_script.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["means"] == ranks[1]["means"]  # every rank ends with the same scores
    assert ranks[0]["switched_off"] == []
    assert set(ATTENTION) <= set(ranks[0]["means"])
    for record in ranks:  # each rank explained its share; gathered, they are every sample's
        assert all(diff < 1e-5 for diff in record["diffs"].values()), record["diffs"]


# -- relevance propagation (Ali et al. 2022's conservative rules) --------------------------------
def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, T, C)`` -> ``(N, heads, T, C / heads)``."""
    return t.reshape(t.shape[0], t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2)


def by_hand_with_constant_attention_and_norms(model: VisionTransformer, x: torch.Tensor):
    """The tiny torchvision ViT's forward written out, the attention probabilities and the
    layer norms' standard deviations detached; returns the class scores."""

    def norm(module: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        centred = t - t.mean(-1, keepdim=True)
        std = (t.var(-1, keepdim=True, unbiased=False) + module.eps).sqrt()
        return centred / std.detach() * module.weight + module.bias

    n = x.shape[0]
    tokens = model.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.class_token.expand(n, -1, -1), tokens], 1)
    tokens = tokens + model.encoder.pos_embedding
    for layer in model.encoder.layers:
        attention = layer.self_attention
        q, k, v = nn.functional.linear(
            norm(layer.ln_1, tokens), attention.in_proj_weight, attention.in_proj_bias
        ).chunk(3, -1)
        q, k, v = (split_heads(t, attention.num_heads) for t in (q, k, v))
        probs = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1).detach()
        mixed = (probs @ v).transpose(1, 2).reshape(n, -1, attention.embed_dim)
        tokens = tokens + attention.out_proj(mixed)
        tokens = tokens + layer.mlp(norm(layer.ln_2, tokens))
    return model.heads(norm(model.encoder.ln, tokens)[:, 0])


def test_transformer_lrp_by_hand_on_two_blocks_of_two_heads():
    model = tv_vit()
    out = explain(model, IMAGES, methods=("transformer_lrp", "input_x_gradient"))
    x = IMAGES.clone().requires_grad_(True)
    scores = by_hand_with_constant_attention_and_norms(model, x)
    assert torch.allclose(scores, out.logits, atol=1e-4)  # the same forward values
    (grad,) = torch.autograd.grad(scores.gather(1, out.targets[:, None]).sum(), x)
    expected = (IMAGES * grad).sum(1)
    scale = float(expected.abs().max())
    assert torch.allclose(out["transformer_lrp"], expected, atol=1e-5 * scale)
    # the rules change the backward: plain gradient x input is another map
    assert not torch.allclose(out["input_x_gradient"], expected, atol=1e-2 * scale)
    assert METHODS["transformer_lrp"].sign == "signed"


@pytest.mark.slow
def test_a_transformer_watched_without_attention_methods_is_told_so_once(tmp_path, caplog):
    import ddp_vit_script
    from helpers import tiny_datamodule, trainer

    from lightning_saliency import SaliencyCallback

    for methods, told in ((["gradcam"], True), (["gradcam", "legrad"], False)):
        caplog.clear()
        callback = SaliencyCallback(num_samples=4, methods=methods)
        trainer(str(tmp_path), [callback], max_epochs=1).fit(
            ddp_vit_script.ViTClassifier(), tiny_datamodule()
        )
        said = [r.getMessage() for r in caplog.records if "vision transformer" in r.getMessage()]
        assert len(said) == (1 if told else 0), said
        if told:
            assert "transformer_lrp" in said[0] and "docs/transformers.md" in said[0]
