"""Generated data sets (no downloads)."""

from lightning_saliency.data.shortcut import (
    SHAPES,
    ShortcutDataModule,
    ShortcutShapes,
    make_shortcut_images,
)

__all__ = ["SHAPES", "ShortcutDataModule", "ShortcutShapes", "make_shortcut_images"]
