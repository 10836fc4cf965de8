"""The server's one way in: the port the sites dial serves Flower's Fleet API and nothing else.

Flower's SuperLink serves its Fleet API (what SuperNodes use), its Control API (list, submit
and stop runs, register SuperNodes) and its ServerApp runtime API on one port, and the Control
API asks nobody who they are. So the SuperLink listens on loopback only, inside the server's
own pod (or, locally, for the server's own processes), and this gate holds the port that the
sites reach: it terminates TLS with the server's certificate and passes on requests for the
Fleet API's paths (and the health check), and answers anything else with 404 without passing it
on. The server itself submits the job's run and registers the sites' keys on loopback.

With notice_port the gate also takes the ServerApp's word that messages are there
(bouquet_workloads.wakes): a site's pull that finds nothing is held until then, HOLD_SECONDS at
most, and asked again; and once a site's reply has passed, the ServerApp is told. When the
ServerApp asks (large replies), a site's reply goes in only while fewer than ADMITTED replies
are waiting in the SuperLink for the ServerApp to take them, REPLY_HOLD_SECONDS at most: the
SuperLink then holds a few replies at a time, not one per site.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611

from . import wakes

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
# A site's pull that finds no message is held until the ServerApp says it pushed some, this long
# at most (the site then asks again at once: an idle site asks about once a second).
HOLD_SECONDS = 1.0
PULL_MESSAGES = "/v1/fleet/pull-messages"
# The longest body a request may have: Flower sends a message's arrays in chunks of 5 MB
# (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), each a request of its own. A longer one is refused (413),
# none of it passed on or kept; a shorter one is passed on as it arrives, never held whole here.
MAX_BODY = 64 * 1024 * 1024
REPLIES = ("/v1/fleet/push-messages", "/v1/fleet/push-object")
# A site's reply opens with its push-messages (the message and the ids of its objects), then
# pushes the objects: held back, the push-messages keeps the whole reply at the site.
PUSH_MESSAGES = "/v1/fleet/push-messages"
ADMITTED = 2
# Below the SuperNode's 30 s read timeout for a call, so that a site never gives up on a hold.
REPLY_HOLD_SECONDS = 20.0


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
    notice_port: int | None = None
    refused: int = 0
    _answered: bool = field(default=False, repr=False)
    _server: uvicorn.Server | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _client: httpx.AsyncClient | None = field(default=None, repr=False)
    _notices: socket.socket | None = field(default=None, repr=False)
    _listener: tuple[str, int] | None = field(default=None, repr=False)  # the ServerApp's datagram address
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _pushes: int = field(default=0, repr=False)  # how many times the ServerApp said it pushed messages
    _pushed: asyncio.Event | None = field(default=None, repr=False)
    _holding: bool = field(default=False, repr=False)  # the last push asked for its replies to be held back
    _untaken: int = field(default=0, repr=False)  # replies let in since, not yet taken by the ServerApp
    _room: asyncio.Event | None = field(default=None, repr=False)  # set when a reply is taken
    held: int = 0  # sites' replies held back, all exchanges together

    @property
    def upstream(self) -> str:
        scheme = "https" if self.cert else "http"
        return f"{scheme}://127.0.0.1:{self.upstream_port}"

    def start(self) -> None:
        """Starts serving on a thread of this process; returns once the port is bound."""
        if self.notice_port is not None:
            self._notices = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._notices.bind(("127.0.0.1", self.notice_port))
            self.notice_port = self._notices.getsockname()[1]  # 0: a free port, chosen here
            threading.Thread(target=self._hear, name="bouquet-gate-notices", daemon=True).start()
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
        """Stops serving, its connections to the SuperLink closed first (a SuperLink told to
        stop waits for its open connections to close)."""
        if self._client is not None and self._loop is not None and self.alive:
            try:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=2)
            except Exception as error:  # stopping anyway: the process's exit closes them
                log.debug("could not close the connections to the SuperLink: %s", error)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._notices is not None:
            self._notices.close()

    def _hear(self) -> None:
        """The ServerApp's datagrams: each says it pushed messages for the sites (and whether
        to hold their replies back), or that it took a reply."""
        while True:
            try:
                said, sender = self._notices.recvfrom(64)
            except OSError:  # closed: the gate stopped
                return
            self._listener = sender
            if self._loop is not None:
                if said == wakes.TAKEN:
                    self._loop.call_soon_threadsafe(self._count_taken)
                else:
                    self._loop.call_soon_threadsafe(self._count_push, said == wakes.PUSHED_HOLD)

    def _count_push(self, hold: bool = False) -> None:
        self._pushes += 1
        if self._pushed is not None:
            self._pushed.set()
        self._pushed = asyncio.Event()
        # A new exchange: what was let in before is the last one's (taken, or never to be).
        self._holding, self._untaken = hold, 0
        self._wake_held()

    def _count_taken(self) -> None:
        self._untaken = max(0, self._untaken - 1)
        self._wake_held()

    def _wake_held(self) -> None:
        """Wakes the replies held back, to look again whether they may go in."""
        if self._room is not None:
            self._room.set()
        self._room = asyncio.Event()

    async def _admit(self) -> None:
        """Waits until a site's reply may go in: fewer than ADMITTED let in and not yet taken,
        or REPLY_HOLD_SECONDS passed."""
        deadline = self._loop.time() + REPLY_HOLD_SECONDS
        if self._holding and self._untaken >= ADMITTED:
            self.held += 1
            if self.held == 1:
                log.info("large replies: a site's is held back while %d wait in the SuperLink for the server to take them", ADMITTED)
        while self._holding and self._untaken >= ADMITTED:
            room = self._room
            try:
                await asyncio.wait_for(room.wait(), deadline - self._loop.time())
            except TimeoutError:
                log.warning("a site's reply went in after %.0f s held back: the server took no reply meanwhile", REPLY_HOLD_SECONDS)
                break
        self._untaken += 1

    def _tell_listener(self) -> None:
        if self._notices is not None and self._listener is not None:
            try:
                self._notices.sendto(b"r", self._listener)
            except OSError:
                pass  # the ServerApp looks for replies on its own too

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
        declared = _content_length(scope["headers"])
        if declared is not None and declared > MAX_BODY:
            try:
                await _discard_body(receive)  # read and dropped, so that the site hears why
            except _Gone:
                return
            await _reply(send, 413, f"a request's body is at most {MAX_BODY} bytes\n".encode())
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        raw = scope.get("raw_path") or path.encode()
        query = scope.get("query_string") or b""
        target = self.upstream + raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        client = self._upstream_client()
        if self._loop is None:
            self._loop, self._pushed, self._room = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        if path == PUSH_MESSAGES and self._holding:
            await self._admit()
            if not await self._pass_on(method, path, receive, send, declared, headers, target, client):
                self._count_taken()  # it never reached the SuperLink: its place is free
            return
        await self._pass_on(method, path, receive, send, declared, headers, target, client)

    async def _pass_on(self, method: str, path: str, receive, send, declared: int | None, headers: list, target: str, client) -> bool:
        """Passes a request on to the SuperLink and its answer back; True if it answered 200."""
        held = self.notice_port is not None and path == PULL_MESSAGES
        try:
            if held or declared is None:  # a pull is sent again while it is held: kept whole (it is small)
                content = await _whole_body(receive)
            else:  # passed on as it comes (an object's chunk is megabytes), with the length it said
                content = _body(receive, declared)
                headers.append((b"content-length", str(declared).encode()))
            # The SuperLink's certificate is checked for localhost, the name the server's own calls use.
            request = client.build_request(method, target, headers=headers, content=content, extensions={"sni_hostname": "localhost"})
            if held:
                await self._pull_held(client, request, send)
                return True
            reply = await client.send(request, stream=True)
        except _TooLarge:
            await _reply(send, 413, f"a request's body is at most {MAX_BODY} bytes, and as long as it says\n".encode())
            return False
        except _Gone:  # the site hung up before its body was whole: nobody to answer
            return False
        except (httpx.HTTPError, RuntimeError) as error:  # RuntimeError: the gate is stopping (its client closed)
            # Before the SuperLink first answered it is starting (the health check polls it meanwhile).
            log.log(logging.ERROR if self._answered else logging.DEBUG, "the SuperLink did not answer %s %s: %s", method, path, error)
            await _reply(send, 502, b"the server is not ready\n")
            return False
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
        if path in REPLIES and reply.status_code == 200:
            self._tell_listener()
        return reply.status_code == 200

    async def _pull_held(self, client: httpx.AsyncClient, request: httpx.Request, send) -> None:
        """A site's pull: passed on, and while the SuperLink has no message for the site, held
        until the ServerApp says it pushed some (then passed on again), HOLD_SECONDS at most."""
        deadline = self._loop.time() + HOLD_SECONDS
        pushes = self._pushes
        reply = await client.send(request)
        while reply.status_code == 200 and _no_messages(reply.content):
            pushed = self._pushed
            if self._pushes == pushes:
                try:
                    await asyncio.wait_for(pushed.wait(), deadline - self._loop.time())
                except TimeoutError:
                    break
            pushes = self._pushes
            reply = await client.send(request)
        self._answered = True
        # The body is whole and decoded here: sent with its own length, without an encoding.
        skip = HOP_BY_HOP | {b"content-encoding"}
        headers = [(k, v) for k, v in reply.headers.raw if k.lower() not in skip]
        headers.append((b"content-length", str(len(reply.content)).encode()))
        await send({"type": "http.response.start", "status": reply.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": reply.content})

    def _upstream_client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca) if self.cert else False
            # Fleet calls are long polls at most a few seconds long; object transfers are 5 MB chunks.
            self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=64))
        return self._client


class _TooLarge(Exception):
    """A request's body is longer than MAX_BODY, or than it said."""


class _Gone(Exception):
    """The site hung up before its request's body was whole."""


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key.lower() == b"content-length":
            return int(value) if value.isdigit() else MAX_BODY + 1  # not a length: refused as too long
    return None


async def _body(receive, limit: int = MAX_BODY):
    """A request's body as it arrives, limit bytes at most."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone()
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge()
        yield chunk
        if not message.get("more_body"):
            return


async def _discard_body(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone()
        if not message.get("more_body"):
            return


async def _whole_body(receive) -> bytes:
    parts = bytearray()
    async for chunk in _body(receive):
        parts += chunk
    return bytes(parts)


def _no_messages(content: bytes) -> bool:
    """Whether a PullMessages response holds no message for the site (nor anything else)."""
    try:
        response = PullMessagesResponse.FromString(content)
    except Exception:  # not Flower's response: pass it on as it is
        return False
    return not response.messages_list and not response.HasField("reconnect")


async def _reply(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
