"""How many rows one pass sends through the model when no one said: on the CPU, as many as
take the memory of 16 images at 224 px. Integrated Gradients, the faithfulness curves and the
shortcut probes size their passes with it.
"""

from __future__ import annotations

from torch import Tensor

CPU_PIXELS = 16 * 224 * 224  # rows per chunk on the CPU: the memory of 16 images at 224 px


def internal_batch_size(option: int | None, images: Tensor) -> int:
    """Rows per pass on the CPU: the option, or (``None``) as many as take the memory of 16
    images at 224 x 224, so small inputs run in few large passes and large ones stay bounded.

    Examples:
        >>> import torch
        >>> internal_batch_size(None, torch.zeros(8, 3, 224, 224))
        16
        >>> internal_batch_size(None, torch.zeros(8, 3, 32, 32))
        784
    """
    if option is not None:
        return int(option)
    pixels = images.shape[-1] * images.shape[-2]
    return max(1, CPU_PIXELS // pixels)
