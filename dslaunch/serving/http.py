"""The HTTP/1.1 side of the front: h11 framing, the OpenAI-compatible routes, SSE streaming.

Requests on one connection are answered in order (keep-alive and pipelining through h11). The
NDJSON limits hold here too: the token is checked from the headers before a body byte is read,
`--max-request-bytes` bounds the body (413), the request head and body arrive within fixed
deadlines (408), an idle keep-alive connection closes after `--idle-timeout`, and every write
has `--write-timeout` (a client that stops reading a stream is cut off and its rows stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11

from dslaunch.serving import openai_api as O
from dslaunch.serving import samples
from dslaunch.serving.batcher import Pending
from dslaunch.serving.metrics import CONTENT_TYPE
from dslaunch.serving.openai_bodies import Shaper
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError, Request

if TYPE_CHECKING:
    from dslaunch.serving.front import Front

MAX_HEAD = 16 << 10  # request line and headers
BODY_S = 60.0  # the longest a request body may take to arrive (or --idle-timeout when shorter)
STATUS = {P.BAD_REQUEST: 400, P.UNAUTHORIZED: 401, "model_not_found": 404, "not_found": 404,
          "method_not_allowed": 405, "request_timeout": 408, P.TOO_LARGE: 413, P.OVERLOADED: 429,
          P.INTERNAL: 500, P.UNAVAILABLE: 503, P.TIMEOUT: 504}  # fmt: skip
KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
        405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
        429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}  # fmt: skip
RETRY_AFTER_S = 2


class _Closed(Exception):
    """The connection is over (timed out, closed by the client, or answered with `connection: close`)."""


def refusal(status: int, message: str) -> bytes:
    """A whole response for a connection the front will not serve (no h11 state behind it)."""
    body = json.dumps(O.error_body(message, P.OVERLOADED, KIND[status])).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def serve_http(front: Front, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> int:
    """Serve one HTTP connection whose first bytes were already read; returns the bytes read."""
    conn = _Http(front, reader, writer)
    conn.h.receive_data(first)
    conn.total = len(first)
    try:
        await conn.run()
    except (_Closed, ConnectionError, OSError):
        pass
    finally:
        for job in conn.jobs:
            job.cancelled = True
    return conn.total


class _Http:
    def __init__(self, front: Front, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.front = front
        self.cfg = front.cfg
        self.reader = reader
        self.writer = writer
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.jobs: set[Pending] = set()
        self.total = 0
        self.route = "?"

    # -- framing -------------------------------------------------------------------------------
    async def run(self) -> None:
        deadline = time.monotonic() + self.front.first_deadline()  # fixed: bytes do not extend it
        while True:
            try:
                event = await self._next(deadline, head=True)
            except h11.RemoteProtocolError as e:
                await self._error(e.error_status_hint or 400, P.BAD_REQUEST, f"malformed HTTP request: {e}"[:300])
                return
            except TimeoutError:
                if self.h.trailing_data[0]:  # part of a request head came: say why it is cut
                    await self._error(408, "request_timeout", "the request did not arrive in time")
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            self.route = "?"
            await self._handle(event)
            if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                return
            self.h.start_next_cycle()
            deadline = time.monotonic() + self.cfg.idle_timeout

    async def _next(self, deadline: float, head: bool = False) -> Any:
        """The next h11 event, reading as needed until `deadline` (raises TimeoutError)."""
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), wait)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            if head and data and self.h.their_state is h11.IDLE:
                # the next request has begun: its head must follow within the fixed deadline
                deadline = min(deadline, time.monotonic() + self.front.first_deadline())
            self.total += len(data)
            self.h.receive_data(data)

    async def _send(self, *events: Any) -> None:
        """Write the events' bytes in one write; wait (at most --write-timeout) only when buffered."""
        data = b"".join(self.h.send(event) or b"" for event in events)
        transport = self.writer.transport
        if transport.is_closing():
            raise _Closed("the connection is closing")
        self.writer.write(data)
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            return  # below the high-water mark: drain() would return at once
        try:
            await asyncio.wait_for(self.writer.drain(), self.cfg.write_timeout)
        except asyncio.TimeoutError:
            transport.abort()
            raise _Closed("the client did not read its answer (--write-timeout)") from None

    async def _respond(self, status: int, body: bytes, ctype: str, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        if self.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Closed("a response was already started")
        hs = [("content-type", ctype), ("content-length", str(len(body))), *headers]
        if self.h.their_state is not h11.DONE and ("connection", "close") not in hs:
            hs.append(("connection", "close"))  # the body was not read (refused early): no next request
        response = h11.Response(status_code=status, headers=hs, reason=HTTPStatus(status).phrase.encode())
        await self._send(response, h11.Data(data=body), h11.EndOfMessage())

    async def _json(self, status: int, obj: Any, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        await self._respond(status, _dumps(obj), "application/json", headers)

    async def _error(self, status: int, code: str, message: str, param: str | None = None, ran: bool = False) -> None:
        """An error in the OpenAI shape; `ran`: the work may have run, so the SDK must not retry."""
        self.front.metrics.request("http", self.route, code)
        if code not in ("not_found", "method_not_allowed", "model_not_found", "request_timeout"):
            self.front.stats.failed(code)
        # `overloaded` never ran the work, wherever it was refused (here or at a replica's queue)
        ran = ran and code != P.OVERLOADED
        headers = [("x-should-retry", "false")] if ran or status in (500, 504) else []
        if status == 503:
            headers.append(("retry-after", str(RETRY_AFTER_S)))
        if status == 401:
            headers.append(("www-authenticate", "Bearer"))
        if status == 405:
            headers.append(("allow", "GET" if self.route in _GET else "POST"))
        if status in (408, 413, 431) or (status == 400 and self.h.their_state is h11.ERROR):
            headers.append(("connection", "close"))
        with contextlib.suppress(h11.LocalProtocolError):
            await self._json(status, O.error_body(message, code, KIND.get(status, "invalid_request_error"), param),
                             headers)  # fmt: skip

    # -- requests ------------------------------------------------------------------------------
    async def _handle(self, event: h11.Request) -> None:
        if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEAD:
            await self._error(431, P.TOO_LARGE, f"the request head is over {MAX_HEAD} bytes")
            raise _Closed("head too large")
        target = event.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        if not self.front.authorised(_bearer(headers.get("authorization", ""))):
            await self._error(401, P.UNAUTHORIZED, "this front needs the job's token: Authorization: Bearer <token>")
            raise _Closed("unauthorised")
        if not self.front.gate.promote(self.writer):  # out of the pre-auth pool, into --max-connections
            await self._error(429, P.OVERLOADED, self.front.overloaded())
            raise _Closed("overloaded")
        method = event.method.decode("ascii", "replace")
        route = _route(path)
        self.route = route or "?"
        try:
            body = await self._body(headers)  # read even when refused: the connection stays usable
            if route is None:
                raise ProtocolError("not_found", f"no route {method} {path}")
            want = "GET" if route in _GET else "POST"
            if method != want:
                raise ProtocolError("method_not_allowed", f"{path} takes {want}")
            await _ROUTES[route](self, path, query, body)
        except ProtocolError as e:
            status = STATUS.get(e.code, 400 if not e.ran else 500)
            await self._error(status, e.code, e.message, getattr(e, "param", None) or O.param_of(e.message), e.ran)
        except (_Closed, ConnectionError, OSError, asyncio.CancelledError):
            raise
        except Exception:
            msg = self.front.log_internal(f"HTTP {route}")
            await self._error(500, P.INTERNAL, msg, ran=True)

    async def _body(self, headers: dict[str, str]) -> bytes:
        limit = self.cfg.limits.max_request_bytes
        length = headers.get("content-length")
        if length is not None and int(length) > limit:
            raise ProtocolError(P.TOO_LARGE, f"the body is {length} bytes; the limit is {limit} (--max-request-bytes)")
        if self.h.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        deadline = time.monotonic() + min(BODY_S, self.cfg.idle_timeout)
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next(deadline)
            except TimeoutError:
                await self._error(408, "request_timeout", "the request body did not arrive in time")
                raise _Closed("body time-out") from None
            except h11.RemoteProtocolError:
                if self.reader.at_eof():  # the client left mid-body: nobody to answer
                    raise _Closed("the client left during the body") from None
                # h11's text may quote the body (the prompt): neither logged nor echoed
                raise ProtocolError(P.BAD_REQUEST, "malformed HTTP request body (its framing)") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise ProtocolError(P.TOO_LARGE, f"the body is over {limit} bytes (--max-request-bytes)")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _Closed("the client left during the body")

    async def _models(self, path: str, _query: str, _body: bytes) -> None:
        name = self.cfg.served_model_name or "model"
        text = self.front.text
        length = await asyncio.to_thread(lambda: text.max_positions) if text is not None and self._generates() else None
        card = O.model_card(name, self.front.stats.started, length)
        if path.rstrip("/") == "/v1/models":
            await self._json(200, {"object": "list", "data": [card]})
        elif path.removeprefix("/v1/models/") == name:
            await self._json(200, card)
        else:
            raise ProtocolError("model_not_found", f"the model {path.removeprefix('/v1/models/')!r} does not exist")
        self.front.metrics.request("http", self.route, "ok")

    async def _health(self, _path: str, query: str, _body: bytes) -> None:
        deep = any(p in ("deep=1", "deep=true") for p in query.split("&"))
        if not deep:
            answer = self.front.health()
        else:
            answer = await self._collect(Request(id="health", op="health", deep=True), self.front.deep_health)
        ready = answer["status"] == "ready"
        headers = [] if ready else [("retry-after", str(RETRY_AFTER_S))]
        await self._json(200 if ready else 503, answer, headers)
        self.front.metrics.request("http", self.route, "ok")

    async def _metrics(self, _path: str, _query: str, _body: bytes) -> None:
        snap = self.front.stats_doc()
        live = {"connections": len(self.front.gate), "restarts": self.front.info.get("restarts", 0),
                "ready": self.front.accepting}  # fmt: skip
        engines = await self.front.engine_docs()
        text = self.front.metrics.render(snap, live, engines, self.cfg.served_model_name or "model")
        await self._respond(200, text, CONTENT_TYPE)
        self.front.metrics.request("http", self.route, "ok")

    async def _collect(self, req: Request, shape: Callable[[list[Any]], Any]) -> Any:
        async with contextlib.aclosing(self.front.run(req, self.jobs)) as events:
            async for event in events:
                if event[0] == "done":
                    return shape(event[1])
        raise ProtocolError(P.INTERNAL, "the request ended without an answer")

    def _generates(self) -> bool:
        return self.front.info.get("task") == "generate"

    async def _tokenizer(self, path: str, _query: str, body: bytes) -> None:
        """/tokenize and /detokenize (vLLM's shapes): the OpenAI routes' tokenizer, off the loop."""
        from dslaunch.serving import tokenize_api

        self._serves("generate", path)
        if self.front.text is None:
            raise ProtocolError(P.BAD_REQUEST, "this model has no tokenizer")
        shape = tokenize_api.tokenize if path == "/tokenize" else tokenize_api.detokenize
        doc = P.load_json(body)
        answer = await asyncio.to_thread(shape, doc, self.cfg.served_model_name or "model", self.front.text)
        await self._json(200, answer)
        self.front.metrics.request("http", self.route, "ok")

    def _serves(self, task: str, route: str) -> None:
        if self.front.info.get("task") != task:
            raise ProtocolError(P.BAD_REQUEST, f"this job serves task {self.front.info.get('task')!r}: {route} "
                                f"needs a job started with --task {task}")  # fmt: skip

    async def _embeddings(self, _path: str, _query: str, body: bytes) -> None:
        self._serves("embed", "/v1/embeddings")
        model = self.cfg.served_model_name or "model"
        req, b64 = O.embedding(P.load_json(body), model, self.cfg.limits)
        vectors = await self._collect(req, lambda r: r)
        tokens = await asyncio.to_thread(self.front.text.count, req.inputs) if self.front.text else 0
        await self._json(200, O.embedding_body(vectors, b64, model, tokens))
        self.front.metrics.request("http", self.route, "ok")

    async def _completions(self, path: str, _query: str, body: bytes) -> None:
        kind = "chat" if path.startswith("/v1/chat/") else "completions"
        self._serves("generate", path)
        ask = O.completion(P.load_json(body), kind, self.cfg.served_model_name or "model", self.cfg.limits)
        if ask.messages is not None:
            if self.front.text is None:
                raise ProtocolError(P.BAD_REQUEST, "this model has no tokenizer, so no chat template")
            tools = ask.tools.tools if ask.tools else None
            ask.req.inputs = [await asyncio.to_thread(self.front.text.chat, ask.messages, tools)]
        shaper = Shaper(ask)
        if not ask.req.stream:
            results = await samples.gather(ask, lambda r: self._collect(r, lambda x: x))
            self.front.metrics.prompt_tokens += shaper.usage(results)["prompt_tokens"]
            await self._json(200, shaper.result(results))
            self.front.metrics.request("http", self.route, "ok")
            return
        await self._stream(ask, shaper)

    async def _stream(self, ask: O.Ask, shaper: Shaper) -> None:
        """SSE: a refusal before the first event is a plain error status; later ones an error event."""
        async with contextlib.aclosing(samples.merged(ask, lambda r: self.front.run(r, self.jobs))) as events:
            first = await events.__anext__()
            sse = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
            await self._send(h11.Response(status_code=200, headers=sse, reason=b"OK"))
            if shaper.chat:  # every choice's role first, in order: the client's stream helper keys on it
                for i in range(ask.n):
                    await self._event(shaper.chunk(i, None, role=True))
            for body in shaper.echo_first():
                await self._event(body)
            event = first
            try:
                while True:
                    if event[0] == "chunk":
                        for body in shaper.streamed(event[1], event[2], event[3]):
                            await self._event(body)
                    else:
                        self.front.metrics.prompt_tokens += shaper.usage(event[1])["prompt_tokens"]
                        for chunk in shaper.closing(event[1]):
                            await self._event(chunk)
                        break
                    event = await events.__anext__()
                outcome = "ok"
            except ProtocolError as e:
                outcome = e.code
                self.front.stats.failed(e.code)
                await self._event(O.error_body(e.message, e.code, KIND.get(STATUS.get(e.code, 500), "server_error")))
            except Exception:
                outcome = P.INTERNAL
                await self._event(O.error_body(self.front.log_internal("HTTP stream"), P.INTERNAL, "server_error"))
        await self._send(h11.Data(data=b"data: [DONE]\n\n"), h11.EndOfMessage())
        self.front.metrics.request("http", self.route, outcome)

    async def _event(self, obj: Any) -> None:
        await self._send(h11.Data(data=b"data: " + _dumps(obj) + b"\n\n"))


_GET = {"models", "health", "metrics"}
_ROUTES: dict[str, Callable[[_Http, str, str, bytes], Awaitable[None]]] = {
    "models": _Http._models,
    "health": _Http._health,
    "metrics": _Http._metrics,
    "embeddings": _Http._embeddings,
    "completions": _Http._completions,
    "chat.completions": _Http._completions,
    "tokenize": _Http._tokenizer,
    "detokenize": _Http._tokenizer,
}


def _route(path: str) -> str | None:
    if path in ("/v1/models", "/v1/models/") or path.startswith("/v1/models/"):
        return "models"
    return {"/health": "health", "/metrics": "metrics", "/v1/embeddings": "embeddings",
            "/v1/completions": "completions", "/v1/chat/completions": "chat.completions",
            "/tokenize": "tokenize", "/detokenize": "detokenize"}.get(path)  # fmt: skip


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _dumps(obj: Any) -> bytes:
    return P.encode(obj)[:-1]
