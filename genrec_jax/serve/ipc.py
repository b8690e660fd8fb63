"""Frames between the HTTP front ends and the engine process (the multi-process server).

One Unix-socket connection per front end, in a private (0700) directory, carries many
requests at once:

    front end  --{"id", "op", "args"}-->  engine process
               <--{"id", "result"} or {"id", "error": {"status", "type", "message", "field"?}}--

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, one object
(encoded and parsed by orjson: the standard library's decoder was the largest single cost
of the engine process per request). Both
ends are our own processes, but a frame is still only data: JSON cannot run code, and a
length above the limit (``frame_limit``), a truncated frame or a payload that is not a JSON
object ends that connection with ``FrameError`` before anything is allocated for it.

``EngineServer`` (engine process) answers each frame with a ``Service`` call;
``EngineClient`` (front end) sends them and matches the answers by id. Errors the engine
raises on purpose travel as their HTTP status and body and are raised again in the front
end (``RemoteError``), so a client sees what the single-process server would answer.

Resolved requests. Once a front end holds a copy of the catalogue (``catalog`` operation,
fetched in pages when the engine is ready), it parses a request's history itself, with the
engine's own ``parse_history``, and sends the result as packed arrays (``"packed"``: the
internal item ids, action ids and timestamps as base64 of their bytes, and the request
time; rank candidates likewise as ``"packed_candidates"``). The engine process then does no
per-event work: it runs under one interpreter lock, so that work bounded how many requests
it could take. A history the copy cannot resolve (an item registered after the copy was
taken, or any invalid field) travels as the client wrote it, and the engine parses it and
answers any error exactly as before.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import os
import struct
import time
import uuid
from typing import Any, Callable

import numpy as np
import orjson

from genrec_jax.config import ServeConfig
from genrec_jax.serve.errors import DeadlineExceeded, EngineUnavailable, RemoteError, ServeError
from genrec_jax.serve.inputs import History

log = logging.getLogger("genrec_jax.serve")

HEADER = struct.Struct(">I")  # payload length in bytes
MIN_FRAME_LIMIT = 4 << 20
CONNECT_TIMEOUT_S = 1.0
DRAIN_ABOVE_BYTES = 1 << 20  # a writer buffering more than this waits for the reader


class FrameError(Exception):
    """A frame that cannot be read: too long, truncated, or not a JSON object."""


def frame_limit(cfg: ServeConfig) -> int:
    """Largest frame either side accepts, in bytes. A request frame re-encodes a body of at
    most ``serve.max_body_bytes`` (absent fields written out as null: a few times larger at
    worst); answers (a page of the catalogue, ranked candidates, metrics) stay well below."""
    return max(MIN_FRAME_LIMIT, 8 * cfg.max_body_bytes)


def encode_frame(obj: dict, limit: int) -> bytes:
    """Raises FrameError past ``limit``; TypeError for what JSON cannot hold (orjson writes
    non-finite floats as null)."""
    try:
        data = orjson.dumps(obj)
    except orjson.JSONEncodeError as e:  # a TypeError subclass: say so, keep the type
        raise TypeError(f"frame not JSON-serialisable: {e}") from None
    if len(data) > limit:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {limit}")
    return HEADER.pack(len(data)) + data


def decode_payload(data: bytes) -> dict:
    try:
        obj = orjson.loads(data)
    except ValueError as e:  # orjson.JSONDecodeError (invalid UTF-8 included) is a ValueError
        raise FrameError(f"payload is not JSON ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise FrameError(f"payload is a JSON {type(obj).__name__}, not an object")
    return obj


async def read_frame(reader: asyncio.StreamReader, limit: int) -> dict | None:
    """The next frame's object, or None when the peer closed the connection between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FrameError("connection closed inside a frame header") from None
    (n,) = HEADER.unpack(header)
    if n == 0 or n > limit:
        raise FrameError(f"frame length {n} is outside [1, {limit}]")
    try:
        data = await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise FrameError(f"connection closed after {len(e.partial)} of {n} payload bytes") from None
    return decode_payload(data)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _unb64(s: Any, dtype, what: str) -> np.ndarray:
    if not isinstance(s, str):
        raise RemoteError(400, "bad_frame", f"packed {what} must be a base64 string")
    try:
        raw = binascii.a2b_base64(s, strict_mode=True)  # strict: only the alphabet, padded
    except ValueError:  # binascii.Error, and non-ASCII text
        raise RemoteError(400, "bad_frame", f"packed {what} is not base64") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise RemoteError(400, "bad_frame", f"packed {what} is not a whole number of {np.dtype(dtype).name}")
    return np.frombuffer(raw, dtype)


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """(min, max) of a non-empty array; for short ones through a memoryview, cheaper than
    two numpy reductions."""
    if len(a) <= 256:
        m = memoryview(a)
        return min(m), max(m)
    return int(a.min()), int(a.max())


def pack_history(h: History) -> list:
    """A parsed history as a frame value (see the module docstring)."""
    return [_b64(h.items.astype(np.int32, copy=False)), _b64(h.actions.astype(np.int32, copy=False)),
            _b64(h.timestamps.astype(np.int64, copy=False)), int(h.request_ts)]


def unpack_history(obj: Any, *, max_events: int, num_items: int, num_actions: int) -> History:
    """The engine's end of ``pack_history``. The front ends are our own processes, but the
    arrays are still checked for what would make a wrong answer rather than an error: equal
    lengths within the limit, item and action ids inside the catalogue."""
    if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[3], int)):
        raise RemoteError(400, "bad_frame", "packed history must be [items, actions, timestamps, request time]")
    items = _unb64(obj[0], np.int32, "items")
    actions = _unb64(obj[1], np.int32, "actions")
    ts = _unb64(obj[2], np.int64, "timestamps")
    n = len(items)
    if not (0 < n <= max_events and len(actions) == n and len(ts) == n):
        raise RemoteError(400, "bad_frame", f"packed history of {n}/{len(actions)}/{len(ts)} events")
    (i_lo, i_hi), (a_lo, a_hi) = _bounds(items), _bounds(actions)
    if i_lo < 1 or i_hi > num_items or a_lo < 0 or a_hi >= num_actions:
        raise RemoteError(400, "bad_frame", "packed history names an item or action outside the catalogue")
    return History(items, actions, ts, obj[3])


def pack_ids(ids: np.ndarray) -> str:
    return _b64(ids.astype(np.int32, copy=False))


def unpack_ids(obj: Any, *, max_ids: int, num_items: int) -> np.ndarray:
    ids = _unb64(obj, np.int32, "ids")
    lo, hi = _bounds(ids) if len(ids) else (0, 0)
    if not 0 < len(ids) <= max_ids or lo < 1 or hi > num_items:
        raise RemoteError(400, "bad_frame", f"packed ids: {len(ids)}, or outside the catalogue")
    return ids


def _error_reply(rid: Any, e: ServeError) -> dict:
    return {"id": rid, "error": {"status": e.status, **e.to_dict()}}


def _internal_reply(rid: Any, op: Any, exc: BaseException) -> dict:
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s in engine operation %r", ref, op, exc_info=exc)
    return {"id": rid, "error": {"status": 500, "type": "internal",
                                 "message": f"internal error (reference {ref}); the server log has the details"}}


# The operations whose times the request-path histograms record (not control calls).
MODEL_OPS = frozenset({"recommend", "rank"})


class EngineServer:
    """The engine process's end: a Unix socket server answering frames with ``service``.

    ``service`` has async ``recommend / rank / add_items / list_items`` taking the args dict,
    ``readiness()`` and ``metrics_text()`` (``app.Service``). Each frame is answered in a
    task of its own, so one connection carries a front end's concurrent requests; answers
    go back in the order they finish. ``on_request(op, seconds)``, if given, gets each
    model request's time from its frame being read to its answer being written."""

    def __init__(self, service: Any, path: str, limit: int,
                 on_request: Callable[[str, float], None] | None = None):
        self.service, self.path, self.limit = service, path, limit
        self.on_request = on_request
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.connections = 0
        self.ops = {"recommend": service.recommend, "rank": service.rank, "add_items": service.add_items,
                    "list_items": service.list_items, "catalog": service.catalog_page, "ready": self._ready,
                    "metrics": self._metrics}

    async def start(self) -> "EngineServer":
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _ready(self, args: dict) -> dict:
        status, body = await self.service.readiness()
        return {"status": status, "body": body}

    async def _metrics(self, args: dict) -> str:
        return (await self.service.metrics_text()).decode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drain_lock = asyncio.Lock()
        try:
            while True:
                try:
                    frame = await read_frame(reader, self.limit)
                except FrameError as e:
                    log.warning("closing a front end's connection: %s", e)
                    break
                if frame is None:
                    break
                task = asyncio.ensure_future(self._answer(frame, writer, drain_lock, time.perf_counter()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def _answer(self, frame: dict, writer: asyncio.StreamWriter, drain_lock: asyncio.Lock,
                      t_read: float) -> None:
        rid, op, args = frame.get("id"), frame.get("op"), frame.get("args")
        try:
            fn = self.ops.get(op) if isinstance(op, str) else None
            if fn is None:
                raise RemoteError(400, "bad_frame", f"unknown operation {op!r}")
            if not isinstance(args, dict):
                raise RemoteError(400, "bad_frame", "args must be an object")
            reply = {"id": rid, "result": await fn(args)}
        except ServeError as e:
            reply = _error_reply(rid, e)
        except Exception as e:  # noqa: BLE001 -- logged here; the client gets a reference only
            reply = _internal_reply(rid, op, e)
        try:
            data = encode_frame(reply, self.limit)
        except (FrameError, TypeError, ValueError) as e:
            data = encode_frame(_internal_reply(rid, op, e), self.limit)
        if writer.is_closing():
            return
        writer.write(data)
        if self.on_request is not None and op in MODEL_OPS:
            self.on_request(op, time.perf_counter() - t_read)
        if writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
            async with drain_lock:
                try:
                    await writer.drain()
                except ConnectionError:
                    pass


class EngineClient:
    """A front end's end: one connection (opened on first use, and again after a break)
    carrying every request; ``call`` waits for its own answer, at most ``timeout_s``.
    ``on_roundtrip(op, seconds)``, if set, gets each answered model request's time from
    sending its frame to reading the answer."""

    def __init__(self, path: str, limit: int, on_roundtrip: Callable[[str, float], None] | None = None):
        self.path, self.limit = path, limit
        self.on_roundtrip = on_roundtrip
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._lock: asyncio.Lock | None = None

    async def call(self, op: str, args: dict, timeout_s: float) -> Any:
        """The engine's answer to ``op(args)``. Raises the engine's error (``RemoteError``),
        ``EngineUnavailable`` (503) when the engine process cannot be reached, or
        ``DeadlineExceeded`` (504) when it does not answer in time."""
        writer = await self._connected()
        if writer.is_closing():  # broke since: its pending calls were already failed
            raise EngineUnavailable("the connection to the engine process broke")
        rid = next(self._ids)
        data = encode_frame({"id": rid, "op": op, "args": args}, self.limit)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            t0 = time.perf_counter()
            writer.write(data)
            async with asyncio.timeout(timeout_s):
                reply = await fut
            if self.on_roundtrip is not None and op in MODEL_OPS:
                self.on_roundtrip(op, time.perf_counter() - t0)
        except TimeoutError:
            raise DeadlineExceeded(f"the engine process did not answer within {1e3 * timeout_s:.0f} ms") from None
        finally:
            self._pending.pop(rid, None)
        err = reply.get("error")
        if err is not None:
            if not isinstance(err, dict):
                raise RemoteError(502, "bad_gateway", "malformed error from the engine process")
            field = err.get("field")
            raise RemoteError(int(err.get("status", 500)), str(err.get("type", "internal")),
                              str(err.get("message", "")), field if isinstance(field, str) else None)
        return reply.get("result")

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        reader, writer = await asyncio.open_unix_connection(self.path)
                except (OSError, TimeoutError) as e:
                    raise EngineUnavailable(f"the engine process is not reachable ({type(e).__name__})") from None
                self._writer = writer
                self._reader_task = asyncio.get_running_loop().create_task(self._read_answers(reader, writer))
        return self._writer

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "the engine process closed the connection"
        try:
            while True:
                frame = await read_frame(reader, self.limit)
                if frame is None:
                    break
                rid = frame.get("id")
                fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except (FrameError, OSError) as e:
            why = f"the connection to the engine process broke ({e})"
            log.warning("%s", why)
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(EngineUnavailable(why))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
