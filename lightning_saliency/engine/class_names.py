"""How a class is called in captions, per-class scores and alarms: its name when the data set
gives one, its number otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence


def class_name(names: Sequence[str] | None, index: int) -> str:
    """The name of class ``index`` (its number when no names are known).

    Examples:
        >>> class_name(["cat", "dog"], 1), class_name(None, 7)
        ('dog', '7')
    """
    if names and 0 <= index < len(names):
        return names[index]
    return str(index)
