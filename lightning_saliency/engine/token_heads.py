"""The class scores a block's tokens would give, for LeGrad: their mean through the model's
final norm and head (torchcam's rule for torchvision's ViT; the same for timm's).

A model not listed gets a rule in :data:`TOKEN_HEADS`, by its qualified class name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_saliency.engine.attention import qualified_name, transformer_of
from lightning_saliency.errors import SaliencyConfigError

TokenHead = Callable[[Tensor], Tensor]


TOKEN_HEADS: dict[str, Callable[[nn.Module], TokenHead | None]] = {}
"""Per model class (``module.Class``): ``model -> (tokens -> class scores)`` for a block's
``(N, T, C)`` tokens, or ``None`` where the model lacks the parts."""


def _torchvision_head(model: nn.Module) -> TokenHead | None:
    encoder, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    norm = getattr(encoder, "ln", None)
    if not isinstance(norm, nn.Module) or not isinstance(heads, nn.Module):
        return None
    return lambda tokens: heads(norm(tokens.mean(1)))


def _timm_head(model: nn.Module) -> TokenHead | None:
    parts = [getattr(model, key, None) for key in ("norm", "fc_norm", "head_drop", "head")]
    if not all(isinstance(part, nn.Module) for part in parts):
        return None
    modules: list[nn.Module] = [p for p in parts if isinstance(p, nn.Module)]

    def scores(tokens: Tensor) -> Tensor:
        pooled = tokens.mean(1)
        for module in modules:
            pooled = module(pooled)
        return pooled

    return scores


TOKEN_HEADS["torchvision.models.vision_transformer.VisionTransformer"] = _torchvision_head
TOKEN_HEADS["timm.models.vision_transformer.VisionTransformer"] = _timm_head


def token_head(model: nn.Module) -> TokenHead:
    """The class scores a block's tokens would give: their mean through the model's final
    norm and head (of the transformer inside ``model``).

    Examples:
        >>> import torch
        >>> from torchvision.models import VisionTransformer
        >>> vit = VisionTransformer(32, 8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8,
        ...                         num_classes=3)
        >>> token_head(vit)(torch.zeros(2, 17, 8)).shape
        torch.Size([2, 3])
    """
    transformer = transformer_of(model)
    for cls in type(transformer).__mro__:
        make = TOKEN_HEADS.get(qualified_name(cls))
        head = make(transformer) if make is not None else None
        if head is not None:
            return head
    raise SaliencyConfigError(
        f"{type(model).__name__}: scoring a block's tokens needs the model's final norm and "
        "head, known for torchvision's and timm's VisionTransformer; for another model add "
        "lightning_saliency.engine.token_heads.TOKEN_HEADS['module.Class'] = "
        "lambda model: (lambda tokens: class scores (N, classes))."
    )
