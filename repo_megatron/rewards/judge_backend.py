"""What a judge backend is: one chat request to one server, answered with text or a
:class:`JudgeCallError` that says whether another attempt could help."""

from __future__ import annotations

import abc


class JudgeCallError(RuntimeError):
    """One judge attempt failed: ``retryable`` for connection errors, timeouts, 429 and 5xx
    (another attempt, maybe on another server, may succeed), not for refused requests."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class JudgeBackend(abc.ABC):
    """Sends chat messages to a judge server. Made inside the event loop that uses it and
    closed with :meth:`aclose` before that loop ends."""

    @abc.abstractmethod
    async def complete(self, url: str, messages: list[dict]) -> str:
        """The judge's answer to ``messages`` from the server at ``url`` (one attempt, within
        the configured timeout); raises :class:`JudgeCallError`."""

    async def aclose(self) -> None:
        """Close connections."""
