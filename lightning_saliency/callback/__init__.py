"""``SaliencyCallback`` and its parts: the checked configuration, the pre-flight dry run, the
fixed samples, one logged run, the failure policy, DDP sharing, and ``SaliencyEarlyStopping``.

Examples:
    >>> from lightning_saliency.callback import SaliencyCallback
"""

from lightning_saliency.callback.callback import SaliencyCallback
from lightning_saliency.callback.early_stopping import SaliencyEarlyStopping

__all__ = ["SaliencyCallback", "SaliencyEarlyStopping"]
