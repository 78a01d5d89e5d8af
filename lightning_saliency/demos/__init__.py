"""What the demo and the tests train on, with nothing downloaded: generated shapes with a
planted shortcut (:mod:`.shapes`) and a small classifier (:mod:`.classifier`).

Examples:
    >>> from lightning_saliency.demos import ShapesClassifier, ShortcutDataModule
"""

from lightning_saliency.demos.classifier import ShapesClassifier
from lightning_saliency.demos.shapes import (
    SHAPES,
    SHORTCUT_KINDS,
    ShortcutDataModule,
    ShortcutShapes,
    make_shortcut_images,
)

__all__ = [
    "SHAPES",
    "SHORTCUT_KINDS",
    "ShapesClassifier",
    "ShortcutDataModule",
    "ShortcutShapes",
    "make_shortcut_images",
]
