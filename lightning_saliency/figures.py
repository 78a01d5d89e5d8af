"""Moved to :mod:`lightning_saliency.viz.figures` in 0.2; this old path still works, with a
``FutureWarning``, until 0.3.
"""

from lightning_saliency.console import moved
from lightning_saliency.viz.figures import *  # noqa: F403

moved(__name__, "lightning_saliency.viz.figures")
