"""Messages for people: one line each on the ``lightning_saliency`` Python logger, rank zero only.

Warnings (a method switched off, an alarm raised) are ``WARNING`` records; routine news (the
layer chosen, an alarm cleared) is ``INFO``. Records propagate, so an application's own logging
setup (or pytest's ``caplog``) receives them; when nothing is configured at all, a console
handler of our own prints them as bare lines, without the source path that ``warnings.warn``
adds.

Examples:
    >>> import logging
    >>> logging.getLogger("lightning_saliency").name
    'lightning_saliency'
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities import rank_zero_only

LOGGER = logging.getLogger("lightning_saliency")


class _FallbackConsole(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints only while the application has configured no logging of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


if not any(isinstance(h, _FallbackConsole) for h in LOGGER.handlers):
    _handler = _FallbackConsole()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
if LOGGER.level == logging.NOTSET:
    LOGGER.setLevel(logging.INFO)


@rank_zero_only
def warn(message: str) -> None:
    """One ``WARNING`` line, from rank zero."""
    LOGGER.warning(message)


@rank_zero_only
def info(message: str) -> None:
    """One ``INFO`` line, from rank zero."""
    LOGGER.info(message)


def moved(old: str, new: str) -> None:
    """Say that the module ``old`` moved to ``new`` (a ``FutureWarning``: the old path keeps
    working for one release).

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     moved("lightning_saliency.figures", "lightning_saliency.viz.figures")
        >>> str(caught[0].message).split(";")[0]
        'lightning_saliency.figures moved to lightning_saliency.viz.figures'
    """
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path goes in 0.3).",
        FutureWarning,
        stacklevel=3,
    )
