"""Generated data sets (no downloads)."""

from lightning_saliency.data.shortcut import (
    SHAPES,
    SHORTCUT_KINDS,
    ShortcutDataModule,
    ShortcutShapes,
    make_shortcut_images,
)

__all__ = [
    "SHAPES",
    "SHORTCUT_KINDS",
    "ShortcutDataModule",
    "ShortcutShapes",
    "make_shortcut_images",
]
