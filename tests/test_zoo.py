"""Every model a user brings: the smallest member of each torchvision and timm family, random
weights, a small input, the four default methods; Grad-CAM against pytorch-grad-cam; and the
attention methods on every transformer.

The table is written by hand: each architecture's expected auto-detected layer, the layer
pytorch-grad-cam's docs use, and how that layer's output is read (``layout``). Running this
file with ``ZOO_TABLE=path`` writes the "Supported models" table of docs/models.md from the run.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torchvision
from helpers import minmax, per_image_corr
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lightning_saliency import SaliencyConfigError, explain
from lightning_saliency.engine.layers import prefix_tokens_of, read_layout, resolve_layer

METHODS = ("gradcam", "guided_gradcam", "dff", "integrated_gradients")


@dataclass(frozen=True)
class Arch:
    library: str  # "torchvision" or "timm"
    name: str
    auto: str  # the layer auto-detection must pick
    reference: str  # the layer pytorch-grad-cam's docs use for this family
    layout: str  # how the reference layer's output is read
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    kaiming: bool = False  # timm's 0.02-std init makes this family's random tokens collapse


V64, I64 = {"image_size": 64}, {"img_size": 64}
INCEPTION = {"aux_logits": False, "init_weights": True}
# fmt: off
ZOO = [  # library, architecture, auto layer, reference layer, its layout, [size, kwargs]
    Arch("torchvision", "resnet18", "layer4", "layer4", "nchw"),
    Arch("torchvision", "resnext50_32x4d", "layer4", "layer4", "nchw"),
    Arch("torchvision", "wide_resnet50_2", "layer4", "layer4", "nchw"),
    Arch("torchvision", "vgg11", "features", "features.20", "nchw"),
    # densenet: norm5's output is ReLUd in place afterwards, which pytorch-grad-cam aliases
    Arch("torchvision", "densenet121", "features", "features.denseblock4", "nchw"),
    Arch("torchvision", "mobilenet_v2", "features", "features.18", "nchw"),
    Arch("torchvision", "mobilenet_v3_small", "features", "features.12", "nchw"),
    Arch("torchvision", "efficientnet_b0", "features", "features.8", "nchw"),
    Arch("torchvision", "efficientnet_v2_s", "features", "features.7", "nchw"),
    Arch("torchvision", "regnet_y_400mf", "trunk_output", "trunk_output", "nchw"),
    Arch("torchvision", "mnasnet0_5", "layers", "layers.16", "nchw"),
    Arch("torchvision", "shufflenet_v2_x0_5", "conv5", "conv5", "nchw", size=128),
    Arch("torchvision", "squeezenet1_1", "features", "features.12", "nchw"),
    Arch("torchvision", "googlenet", "inception5b", "inception5b", "nchw", kwargs=INCEPTION),
    Arch("torchvision", "inception_v3", "Mixed_7c", "Mixed_7c", "nchw", 160, INCEPTION),
    Arch("torchvision", "convnext_tiny", "features", "features.7", "nchw"),
    Arch("torchvision", "maxvit_t", "blocks.3", "blocks.3", "nchw", size=224),
    Arch("torchvision", "swin_t", "permute", "features.7.1.norm1", "nhwc"),
    Arch("torchvision", "swin_v2_t", "permute", "features.7.1.norm1", "nhwc"),
    Arch("torchvision", "vit_b_16", "encoder.layers.encoder_layer_11.ln_1",
         "encoder.layers.encoder_layer_11.ln_1", "tokens", kwargs=V64),
    Arch("timm", "resnet18", "layer4", "layer4", "nchw"),
    Arch("timm", "convnext_atto", "norm_pre", "stages.3", "nchw"),
    Arch("timm", "efficientnet_b0", "bn2", "bn2", "nchw"),
    Arch("timm", "regnetx_002", "final_conv", "s4", "nchw"),
    Arch("timm", "vit_tiny_patch16_224", "blocks.11.norm1", "blocks.11.norm1", "tokens",
         kwargs=I64),
    Arch("timm", "deit_tiny_distilled_patch16_224", "blocks.11.norm1", "blocks.11.norm1",
         "tokens", kwargs=I64),
    Arch("timm", "vit_little_patch16_reg4_gap_256", "norm", "blocks.11.norm1", "tokens",
         kwargs=I64),
    Arch("timm", "swin_tiny_patch4_window7_224", "norm", "layers.3.blocks.1.norm1", "nhwc",
         kwargs={**I64, "window_size": 2}),
    Arch("timm", "mobilevit_xxs", "final_conv", "final_conv", "nchw"),
    Arch("timm", "levit_128s", "stages", "stages.2", "tokens", size=224, kaiming=True),
]
# fmt: on


def build(arch: Arch) -> nn.Module:
    torch.manual_seed(0)
    if arch.library == "torchvision":
        model = torchvision.models.get_model(arch.name, weights=None, num_classes=10, **arch.kwargs)
    else:
        model = timm.create_model(arch.name, pretrained=False, num_classes=10, **arch.kwargs)
    for module in model.modules() if arch.kaiming else ():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight)
    for module in model.modules():  # zero-initialised heads (ViT, Swin) get random values,
        if isinstance(module, nn.Linear) and module.out_features == 10:
            nn.init.normal_(module.weight, std=0.5)
        norm_weight = getattr(module, "weight", None)  # and zero-initialised norms (LeViT) ones
        batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        if isinstance(module, batch_norms) and not bool(norm_weight.any()):
            nn.init.ones_(norm_weight)
    return model.eval()


def reshape_for(arch: Arch, model: nn.Module) -> Any:
    """pytorch-grad-cam's ``reshape_transform`` for the reference layer, written out."""
    if arch.layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if arch.layout == "tokens":
        prefix = prefix_tokens_of(model)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            reading = read_layout(t, t.shape[0], (arch.size, arch.size), "tokens", None, prefix)
            return reading.to_spatial(t)

        return tokens
    return None


RESULTS: dict[str, dict[str, Any]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ZOO, ids=[f"{a.library}:{a.name}" for a in ZOO])
def test_every_architecture(arch):
    model = build(arch)
    images = torch.randn(2, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(1))
    out = explain(model, images, methods=METHODS, ig_steps=4)
    assert out.layer_name == arch.auto
    for method, maps in out.items():
        expected = (2, 4, arch.size, arch.size) if method == "dff" else (2, arch.size, arch.size)
        assert maps.shape == expected, method
        assert bool(torch.isfinite(maps).all()), method
        flat = maps.flatten(1).double()
        spread = flat.std(1) / flat.abs().amax(1).clamp(min=1e-300)
        assert float(spread.min()) > 1e-3, f"{method} gives a constant map"
    # Grad-CAM at the reference layer against pytorch-grad-cam, for the predicted classes
    targets = out.targets
    ours = explain(model, images, targets, ("gradcam",), arch.reference, layout=arch.layout)
    reference_model = copy.deepcopy(model)
    _, layer = resolve_layer(reference_model, arch.reference)
    with GradCAM(reference_model, [layer], reshape_transform=reshape_for(arch, model)) as cam:
        ref = torch.from_numpy(cam(images, [ClassifierOutputTarget(int(t)) for t in targets]))
    alive = ref.flatten(1).amax(1) > 0
    assert bool(alive.any()), "pytorch-grad-cam's maps are all zero: choose another target"
    corr = per_image_corr(minmax(ours["gradcam"][alive]), ref[alive])
    assert not bool(torch.isnan(corr).any()) and float(corr.min()) >= 0.99, corr
    RESULTS[f"{arch.library}:{arch.name}"] = {"auto": out.layer_name, "corr": float(corr.min())}
    _write_table()


def _write_table() -> None:
    path = os.environ.get("ZOO_TABLE")
    if not path:
        return
    rows = ["| library | architecture | auto layer | reference layer (layout) | Grad-CAM corr. |"]
    rows.append("| --- | --- | --- | --- | --- |")
    for arch in ZOO:
        found = RESULTS.get(f"{arch.library}:{arch.name}")
        if found:
            rows.append(
                f"| {arch.library} | `{arch.name}` | `{found['auto']}` | `{arch.reference}` "
                f"({arch.layout}) | {found['corr']:.3f} |"
            )
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")


ATTENTION_METHODS = ("attention_rollout", "generic_attention", "legrad", "transformer_lrp")
# every transformer of the zoo: the attention methods' maps, or the setup error that says why
# attention cannot be multiplied through to the image there (docs/models.md)
TRANSFORMERS = {
    "torchvision:vit_b_16": None,
    "timm:vit_tiny_patch16_224": None,
    "timm:deit_tiny_distilled_patch16_224": None,
    "timm:vit_little_patch16_reg4_gap_256": None,
    "torchvision:swin_t": "attends within windows",
    "torchvision:swin_v2_t": "attends within windows",
    "timm:swin_tiny_patch4_window7_224": "attends within windows",
    "torchvision:maxvit_t": "attends within windows",
    "timm:mobilevit_xxs": "batch is not the images'",
    "timm:levit_128s": "no rule reads",
}
TRANSFORMER_ARCHS = [a for a in ZOO if f"{a.library}:{a.name}" in TRANSFORMERS]
# transformer_attribution follows the authors' rules, which cover plain blocks and one linear
# head on the class token: DeiT's two averaged heads and the register model (layer scale,
# a pooled head) are refused
ATTRIBUTION_REFUSED = {
    "timm:deit_tiny_distilled_patch16_224": "linear head on the class token",
    "timm:vit_little_patch16_reg4_gap_256": "plain ViT blocks",  # layer scale, pooled
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", TRANSFORMER_ARCHS, ids=[f"{a.library}:{a.name}" for a in TRANSFORMER_ARCHS]
)
def test_attention_methods_on_every_transformer(arch):
    model = build(arch)
    images = torch.randn(2, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(1))
    key = f"{arch.library}:{arch.name}"
    refused = TRANSFORMERS[key]
    if refused is not None:
        for method in (*ATTENTION_METHODS, "transformer_attribution"):
            with pytest.raises(SaliencyConfigError, match=refused):
                explain(model, images, methods=(method,))
        return
    methods = ATTENTION_METHODS
    if key in ATTRIBUTION_REFUSED:
        with pytest.raises(SaliencyConfigError, match=ATTRIBUTION_REFUSED[key]):
            explain(model, images, methods=("transformer_attribution",))
    else:
        methods = (*methods, "transformer_attribution")
    out = explain(model, images, methods=methods)
    for method, maps in out.items():
        assert maps.shape == (2, arch.size, arch.size), method
        assert bool(torch.isfinite(maps).all()), method
        flat = maps.flatten(1).double()
        spread = flat.std(1) / flat.abs().amax(1).clamp(min=1e-300)
        assert float(spread.min()) > 1e-3, f"{method} gives a constant map"
