"""The server's one way in: the port the sites dial serves Flower's Fleet API and nothing else.

Flower's SuperLink serves its Fleet API (what SuperNodes use), its Control API (list, submit
and stop runs, register SuperNodes) and its ServerApp runtime API on one port, and the Control
API asks nobody who they are. So the SuperLink listens on loopback only, inside the server's
own pod (or, locally, for the server's own processes), and this gate holds the port that the
sites reach: it terminates TLS with the server's certificate and passes on requests for the
Fleet API's paths (and the health check), and answers anything else with 404 without passing it
on. The server itself submits the job's run and registers the sites' keys on loopback.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn

log = logging.getLogger("bouquet_workloads.gate")

FLEET_PREFIX = "/v1/fleet/"
HEALTH = "/health"
# Headers that describe one connection, not the request: never passed on.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}
START_SECONDS = 10


def allowed(method: str, path: str) -> bool:
    """What may pass: a SuperNode's Fleet API calls (all POST) and a GET of the health check."""
    if method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path and "//" not in path:
        return True
    return method == "GET" and path == HEALTH


@dataclass
class Gate:
    """Listens on host:port and forwards what `allowed` admits to the SuperLink on
    127.0.0.1:upstream_port. With cert and key it speaks TLS on both sides (verifying the
    SuperLink against ca); without, plain HTTP (a job with TLS disabled)."""

    host: str
    port: int
    upstream_port: int
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    refused: int = 0
    _answered: bool = field(default=False, repr=False)
    _server: uvicorn.Server | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    @property
    def upstream(self) -> str:
        scheme = "https" if self.cert else "http"
        return f"{scheme}://127.0.0.1:{self.upstream_port}"

    def start(self) -> None:
        """Starts serving on a thread of this process; returns once the port is bound."""
        config = uvicorn.Config(
            self._app,
            host=self.host,
            port=self.port,
            ssl_certfile=self.cert,
            ssl_keyfile=self.key,
            lifespan="off",
            interface="asgi3",
            ws="none",
            proxy_headers=False,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="bouquet-gate", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the server's port {self.host}:{self.port} could not be opened (is it in use?)")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path):
            self.refused += 1
            peer = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s: only Flower's Fleet API is served on this port", method, path, peer[0])
            await _reply(send, 404, b"not found: this port serves only Flower's Fleet API\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        raw = scope.get("raw_path") or path.encode()
        query = scope.get("query_string") or b""
        target = self.upstream + raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        client = self._upstream_client()
        try:
            # The SuperLink's certificate is checked for localhost, the name the server's own calls use.
            request = client.build_request(method, target, headers=headers, content=bytes(body), extensions={"sni_hostname": "localhost"})
            reply = await client.send(request, stream=True)
        except httpx.HTTPError as error:
            # Before the SuperLink first answered it is starting (the health check polls it meanwhile).
            log.log(logging.ERROR if self._answered else logging.DEBUG, "the SuperLink did not answer %s %s: %s", method, path, error)
            await _reply(send, 502, b"the server is not ready\n")
            return
        self._answered = True
        try:
            # The body as the SuperLink sent it (not decoded), with its own length and encoding.
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status_code,
                    "headers": [(k, v) for k, v in reply.headers.raw if k.lower() not in HOP_BY_HOP or k.lower() == b"content-length"],
                }
            )
            async for chunk in reply.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await reply.aclose()

    def _upstream_client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca) if self.cert else False
            # Fleet calls are long polls at most a few seconds long; object transfers are 5 MB chunks.
            self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=64))
        return self._client


async def _reply(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
