"""The failure policy: a monitor never takes down a method it does not own, or the run.

:class:`FailurePolicy` is the one place the callback turns an exception into what people see:

- a step of the bookkeeping (moving the samples, scoring, probing, drawing, writing) runs in
  :meth:`FailurePolicy.step`; a failure is said once per kind on the ``lightning_saliency``
  logger, and the run goes on without that step;
- a method that fails (to explain, to score, to draw) is reported with
  :meth:`FailurePolicy.failed` and switched off by :meth:`FailurePolicy.agree`, which every
  rank calls at the same points with the same methods: one collective tells every rank what
  failed anywhere, so all ranks keep the same methods and enter the same collectives after;
- what happened joins the run's alarm text (:meth:`FailurePolicy.news`) for people who only
  look at TensorBoard.

Examples:
    >>> policy = FailurePolicy()
    >>> with policy.step("scores", "scoring", "no scores this run"):
    ...     raise ValueError("NaN")
    >>> policy.failed("gradcam", RuntimeError("no gradient"))
    >>> from lightning_saliency.callback.sharing import Sharing
    >>> policy.agree(Sharing(), ["gradcam", "dff"])  # one process
    >>> policy.switched_off
    {'gradcam': "RuntimeError('no gradient')"}
    >>> policy.news()
    ['gradcam failed and is switched off from now on (RuntimeError: no gradient); the other methods and training go on.']
"""  # noqa: E501

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

from lightning_saliency import console


class Agreement(Protocol):
    """What the policy needs of the ranks: which flags are raised on any rank."""

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """Flag ``i`` is raised if it is raised on any rank (the same answer on every rank)."""
        ...


class FailurePolicy:
    """What failed in a fit: the methods switched off (with the error that did it), the
    warnings already said, and the lines for the next alarm text."""

    def __init__(self) -> None:
        self.switched_off: dict[str, str] = {}
        self._pending: dict[str, BaseException] = {}
        self._said: set[str] = set()
        self._news: list[str] = []

    def is_on(self, method: str) -> bool:
        return method not in self.switched_off

    @contextlib.contextmanager
    def step(self, key: str, what: str, consequence: str) -> Iterator[None]:
        """Run one step of the bookkeeping: a failure warns once per ``key`` ("``what``
        failed (error); ``consequence``") and is swallowed, so the run goes on."""
        try:
            yield
        except Exception as err:
            self.warn_failed(key, what, err, consequence)

    def warn_failed(self, key: str, what: str, err: BaseException, consequence: str) -> None:
        """Once per ``key``: "``what`` failed (error); ``consequence``"."""
        self.warn_once(key, f"SaliencyCallback: {what} failed ({describe(err)}); {consequence}.")

    def failed(self, method: str, error: BaseException) -> None:
        """``method`` failed on this rank; it is switched off at the next :meth:`agree`."""
        self._pending.setdefault(method, error)

    def agree(self, ranks: Agreement, methods: Sequence[str]) -> None:
        """Switch off each of ``methods`` that failed on any rank, on every rank alike. Every
        rank calls this at the same point with the same ``methods``."""
        flags = ranks.any_rank([m in self._pending for m in methods])
        for method, failed in zip(methods, flags):
            error = self._pending.pop(method, None)
            if failed and method not in self.switched_off:
                self._switch_off(method, error or RuntimeError("failed on another rank"))

    def warn_once(self, key: str, message: str) -> bool:
        """A warning said once per ``key`` in a fit, then quiet; whether it was said now."""
        if key in self._said:
            return False
        self._said.add(key)
        console.warn(message)
        return True

    def announce(self, line: str) -> None:
        """A line for this run's alarm text."""
        self._news.append(line.removeprefix("SaliencyCallback: "))

    def news(self) -> list[str]:
        """The lines gathered since the last call (and forgets them)."""
        news, self._news = self._news, []
        return news

    @property
    def has_news(self) -> bool:
        return bool(self._news)

    def _switch_off(self, method: str, error: BaseException) -> None:
        """Said once on the ``lightning_saliency`` logger and in the alarm text; the method is
        skipped from now on, the others and training go on."""
        self.switched_off[method] = repr(error)
        message = (
            f"SaliencyCallback: {method} failed and is switched off from now on "
            f"({describe(error)}); the other methods and training go on."
        )
        console.warn(message)
        self.announce(message)


def describe(err: BaseException) -> str:
    """``Type: first line of the message``.

    Examples:
        >>> describe(ValueError("bad value\\nmore"))
        'ValueError: bad value'
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
