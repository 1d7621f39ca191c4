"""ASGI guards in front of the scoring API, answering in the API's error schema ({"detail": ...}):

  TrustedHosts  requests whose Host header is not on the list are answered 400 (DNS-rebinding, host spoofing)
  BodyLimit     a declared Content-Length over the limit is answered 413 before a byte is read, and a body that
                grows past it (chunked, or lying about its length) as soon as it does: nothing over the limit is
                buffered or parsed"""
from __future__ import annotations

import json


async def send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class TrustedHosts:
    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {h.strip().lower() for h in allowed if h.strip()}

    def _host(self, scope) -> str:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
        if host.startswith("["):  # [::1]:8000
            return host[1:host.find("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.any and self._host(scope) not in self.allowed:
            return await send_error(send, 400, "invalid Host header")
        return await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _too_large(self, send) -> None:
        await send_error(send, 413, f"request body over {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(send)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                # read (and drop) at most as much again, so a client that overshot a little still gets the answer
                # instead of a reset connection; then answer and close
                dropped = 0
                while more and dropped < self.max_bytes:
                    msg = await receive()
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
