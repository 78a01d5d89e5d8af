"""TensorBoard's event-record checksum in C, byte for byte the checksum TensorBoard writes.

Every record TensorBoard writes (``tensorboard.summary.writer.record_writer``) carries a
masked CRC-32C of its bytes, and without TensorFlow TensorBoard computes it in pure Python, a
byte at a time: about 0.2 s per MB, holding the GIL. The callback's pictures are 0.3-0.7 MB
per logged epoch, so that loop took 0.1-0.2 s of every logged epoch from the training thread.
``google-crc32c`` (Google's maintained C implementation, a dependency) computes the same CRC
in microseconds; :func:`masked` applies TensorBoard's mask to it.

:func:`installed` puts :func:`masked` in TensorBoard's record writer while a run writes to a
``TensorBoardLogger`` and puts TensorBoard's own back after (nested uses count). The patch is
process-wide: while it is in, every TensorBoard writer of the process uses it, writing the
same bytes. Where ``google-crc32c`` has only its pure-Python fallback (no wheel for the
platform), or is not installed, TensorBoard's function is left alone: the fallback is no
faster.

Examples:
    >>> from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    >>> data = bytes(range(256)) * 40
    >>> masked(data) == masked_crc32c(data)
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

try:
    import google_crc32c
except ImportError:  # not installed (a run from a source tree without the dependencies)
    google_crc32c = None  # type: ignore[assignment]

_MASK = 0xFFFFFFFF


def fast() -> bool:
    """Whether ``google-crc32c`` is installed and runs its C implementation here."""
    return google_crc32c is not None and google_crc32c.implementation == "c"


def masked(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of a record (``masked_crc32c``)."""
    x = int(google_crc32c.value(bytes(data)))
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & _MASK


_lock = threading.Lock()
_users = 0
_original: object = None


@contextlib.contextmanager
def installed() -> Iterator[bool]:
    """Within it, TensorBoard's record writer checksums with :func:`masked`; yields whether it
    does (``False``: no C implementation here, or TensorBoard's layout changed; nothing was
    touched).

    Examples:
        >>> from tensorboard.summary.writer import record_writer
        >>> with installed() as done:
        ...     done == (record_writer.masked_crc32c is masked)
        True
        >>> record_writer.masked_crc32c is masked
        False
    """
    global _users, _original
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:
        yield False
        return
    if not fast() or not hasattr(record_writer, "masked_crc32c"):
        yield False
        return
    with _lock:
        if _users == 0:
            _original = record_writer.masked_crc32c
            record_writer.masked_crc32c = masked
        _users += 1
    try:
        yield True
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                record_writer.masked_crc32c = _original
                _original = None


__all__ = ["fast", "installed", "masked"]
