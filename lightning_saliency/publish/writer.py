"""One background thread that does the loggers' slow work off the training thread.

PNG encoding, event-file writes and logger API calls (W&B, MLflow) cost more than the
explanation itself on small models: about 0.3 s per logged epoch of the demo, all of it on the
training thread before this module. :class:`BackgroundWriter` runs such jobs on one worker,
in the order they were submitted, through a bounded queue:

- nothing is dropped: when the queue is full the training thread waits for the worker (and
  says so once), so memory stays bounded by ``capacity`` jobs (:data:`CAPACITY`: a logged run
  submits about five, so the worker may fall a few logged runs behind, a few MB of pictures,
  before training waits);
- a job that raises does not stop the worker; its error is kept for :meth:`flush` and
  :meth:`take_errors`, and the submitter decides the policy (the callback's: warn once, that
  logger's pictures stop, training goes on);
- :meth:`flush` waits for every job submitted so far: the callback flushes at the end of
  ``fit``, ``validate`` and ``test``, and on an exception, before Lightning closes its loggers.

Examples:
    >>> writer = BackgroundWriter(capacity=8)
    >>> seen = []
    >>> for i in range(5):
    ...     writer.submit(lambda i=i: seen.append(i))
    >>> writer.flush()
    []
    >>> seen
    [0, 1, 2, 3, 4]
    >>> writer.close()
    []
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from lightning_saliency import console

_STOP = object()


CAPACITY = 32
"""Jobs the queue holds before the training thread waits."""


class BackgroundWriter:
    """Runs submitted jobs in order on one daemon thread, through a queue of ``capacity``."""

    def __init__(self, capacity: int = CAPACITY, name: str = "lightning-saliency-writer") -> None:
        self.capacity = max(1, capacity)
        self.name = name
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.capacity)
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.waited = 0  # how many submits found the queue full

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; when ``capacity`` jobs are waiting, wait for the worker (said once)."""
        self._start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if not self.waited:
                console.warn(
                    "SaliencyCallback: the loggers are slower than the logged epochs; training "
                    "waits for them (no picture is dropped). Log less often (every_n_epochs) "
                    "or fewer samples to avoid the wait."
                )
            self.waited += 1
            self._queue.put(job)

    def flush(self) -> list[BaseException]:
        """Wait until every submitted job has run; return (and forget) their errors."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
        return self.take_errors()

    def take_errors(self) -> list[BaseException]:
        """The errors of the jobs run since the last call, oldest first."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def close(self) -> list[BaseException]:
        """Flush, then stop the worker (a later :meth:`submit` starts a new one)."""
        errors = self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._thread = None
        return errors

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                job()  # type: ignore[operator]
            except BaseException as err:  # kept for the submitter's failure policy
                with self._lock:
                    self._errors.append(err)
            finally:
                self._queue.task_done()
