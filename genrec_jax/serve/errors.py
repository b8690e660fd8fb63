"""Errors the serving stack raises on purpose, each with the HTTP status it maps to.

The engine and the batcher know nothing about HTTP; they raise these, and ``app.py`` turns
each into a JSON body ``{"error": {"type", "message", "field"?}}`` with ``status``. Anything
else that escapes is an internal error: logged on the server, a generic 500 for the client
(never a stack trace).
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class: ``status`` (HTTP) and ``kind`` (metric label, error ``type`` in the body)."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        out = {"type": self.kind, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class RequestError(ServeError):
    """The request is well-formed JSON but its content is invalid (unknown item, k out of
    range, history too long...). ``field`` names the offending field (``history[3].item_id``)."""

    status = 422
    kind = "invalid_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field)


class Conflict(ServeError):
    """The checkpoint cannot do what was asked (no semantic-ID decoder, no RQ-VAE)."""

    status = 409
    kind = "unsupported"


class Overloaded(ServeError):
    """The request queue is full: refused at once so the caller can retry elsewhere."""

    status = 503
    kind = "queue_full"


class NotReady(ServeError):
    """The engine is still loading or compiling its executables."""

    status = 503
    kind = "not_ready"


class DeadlineExceeded(ServeError):
    """The request waited past its deadline (in the queue or in the batch)."""

    status = 504
    kind = "deadline_exceeded"


class ShuttingDown(ServeError):
    status = 503
    kind = "shutting_down"


class EngineUnavailable(ServeError):
    """Multi-process server: a front end cannot reach the engine process (gone, or its
    connection broke while the request waited)."""

    status = 503
    kind = "engine_unavailable"


class RemoteError(ServeError):
    """An error the engine process answered with, raised again in the front end so that the
    client gets the same status and body as from the single-process server."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None):
        super().__init__(message, field)
        self.status = status if 400 <= status <= 599 else 502
        self.kind = kind
