"""Moved to :mod:`lightning_saliency.publish.event_checksum` in 0.2; this old path still works, with
a ``FutureWarning``, until 0.3.
"""

from lightning_saliency.console import moved
from lightning_saliency.publish.event_checksum import *  # noqa: F403

moved(__name__, "lightning_saliency.publish.event_checksum")
