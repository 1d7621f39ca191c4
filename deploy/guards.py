"""What stands in front of the scoring API, answering in the API's error schema ({"detail": ...}) and closing the
connection, outermost first:

  HeadDeadlineH11  (the HTTP protocol) a request head must be complete within uvicorn's keep-alive timeout of the
                   connection being ready (opened, or its last response sent): an idle or trickling client is
                   answered 408 and cut off (uvicorn alone waits for a head forever); h11 bounds the head's size
  TrustedHosts     exactly one Host header, and one on the list, or 400 (DNS rebinding, host spoofing; Starlette
                   reads the first of two Host headers, so two are refused)
  Authenticate     the routes that need a key are answered 401/403 (and 429 when its rate limit is spent) from the
                   head alone: an unauthenticated body is never read
  BodyLimit        a declared Content-Length over the limit is answered 413 before a byte is read, a body that
                   grows past it (chunked, or lying about its length) as soon as it does, and one that has not
                   arrived within the read timeout 408: nothing over the limit is buffered or parsed"""
from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_bytes(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode()


async def send_error(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = error_bytes(detail)
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: `timeout_keep_alive` seconds from the moment
    the connection can take a request. uvicorn's own keep-alive timer stops at the first byte, so a client sending
    one header byte at a time (or nothing, on a fresh connection) held a connection for ever."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the body's deadline is BodyLimit's
            self._cancel_head_deadline()
        elif self._head_timer is None and not self.transport.is_closing():  # a cycle began in here (pipelining)
            self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection ends (idle ones just close)
            body = error_bytes(f"the request head did not arrive within {self.timeout_keep_alive:g} s")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class TrustedHosts:
    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {h.strip().lower() for h in allowed if h.strip()}

    @staticmethod
    def _name(host: str) -> str:
        host = host.lower()
        if host.startswith("["):  # [::1]:8000
            return host[1:host.find("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            hosts = [v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"host"]
            if len(hosts) != 1:
                return await send_error(send, 400, "exactly one Host header is required")
            if not self.any and self._name(hosts[0]) not in self.allowed:
                return await send_error(send, 400, "invalid Host header")
        return await self.app(scope, receive, send)


class Authenticate:
    """`guarded` maps (method, path) to the scopes its route needs; `check(headers, client, scopes)` returns the
    caller (kept in the request's state for the route) or raises one of semalign's errors, whose status and
    message are the answer (401 with WWW-Authenticate, 403, 429 with Retry-After)."""

    def __init__(self, app, check, guarded: dict[tuple[str, str], set[str]]):
        self.app, self.check, self.guarded = app, check, guarded

    async def __call__(self, scope, receive, send):
        needed = self.guarded.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if needed is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        client = scope["client"][0] if scope.get("client") else "unknown"
        from starlette.concurrency import run_in_threadpool

        from semalign.errors import SemalignError

        try:  # in a thread: the rate counts may live in Redis or sqlite
            caller = await run_in_threadpool(self.check, headers, client, needed)
        except SemalignError as e:
            extra = {"WWW-Authenticate": "Bearer"} if e.http_status == 401 else {}
            if hasattr(e, "retry_after_s"):
                extra["Retry-After"] = str(e.retry_after_s)
            return await send_error(send, e.http_status, str(e), extra)
        scope.setdefault("state", {})["caller"] = caller
        return await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int, read_timeout_s: float):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def _too_large(self, send) -> None:
        await send_error(send, 413, f"request body over {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        body, more = bytearray(), True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within "
                                                   f"{self.read_timeout_s:g} s")
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                # read (and drop) at most as much again, so a client that overshot a little still gets the answer
                # instead of a reset connection; then answer and close
                dropped = 0
                while more and dropped < self.max_bytes and loop.time() < deadline:
                    try:
                        msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        break
                    dropped += len(msg.get("body", b""))
                    more = msg.get("more_body", False) and msg["type"] != "http.disconnect"
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
