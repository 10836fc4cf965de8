"""The gate passes on the Fleet API's requests and the health check, and nothing else: what
it refuses never reaches the SuperLink (here a plain HTTP server that counts what arrives)."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request

import pytest
from flwr.proto.fleet_pb2 import PullMessagesResponse
from flwr.proto.message_pb2 import Message

from bouquet_workloads import gate as gate_module
from bouquet_workloads import wakes
from bouquet_workloads.gate import Gate, allowed
from support.kubelet import wait_for
from support.prometheus import free_port


@pytest.mark.parametrize(
    ("method", "path", "passes"),
    [
        ("POST", "/v1/fleet/pull-messages", True),
        ("POST", "/v1/fleet/create-node", True),
        ("GET", "/health", True),
        ("GET", "/v1/fleet/pull-messages", False),
        ("POST", "/v1/control/list-runs", False),
        ("POST", "/v1/control/start-run", False),
        ("POST", "/v1/control/register-node", False),
        ("POST", "/v1/runtime/pull-messages", False),
        ("POST", "/v1/fleet/../control/list-runs", False),
        ("POST", "/v1/fleet//control", False),
        ("POST", "/v1/fleetx/anything", False),
        ("GET", "/docs", False),
        ("GET", "/openapi.json", False),
        ("POST", "/health", False),
        ("GET", "/", False),
    ],
)
def test_only_fleet_calls_and_the_health_check_pass(method, path, passes):
    assert allowed(method, path) is passes


class Upstream(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        Upstream.seen.append(f"{self.command} {self.path} {body.decode()}")
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_what_the_gate_refuses_never_reaches_the_superlink():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gate = Gate("127.0.0.1", free_port(), upstream.server_address[1])
    gate.start()
    Upstream.seen.clear()
    try:
        assert call(gate.port, "POST", "/v1/fleet/pull-messages", b"from a site") == (200, b"ok")
        assert call(gate.port, "GET", "/health") == (200, b"ok")
        for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/start-run"), ("GET", "/docs")]:
            status, body = call(gate.port, method, path, b"" if method == "POST" else None)
            assert status == 404 and b"only Flower's Fleet API" in body
        assert Upstream.seen == ["POST /v1/fleet/pull-messages from a site", "GET /health "]
        assert gate.refused == 3
    finally:
        gate.stop()
        upstream.shutdown()
    assert not gate.alive


def test_a_body_is_passed_on_whole_and_one_too_long_never_reaches_the_superlink(monkeypatch):
    monkeypatch.setattr(gate_module, "MAX_BODY", 8 * 1024 * 1024)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gate = Gate("127.0.0.1", free_port(), upstream.server_address[1])
    gate.start()
    Upstream.seen.clear()
    chunk = bytes(range(48, 58)) * (6 * 1024 * 1024 // 10)  # an object's chunk: megabytes, passed on as they come
    try:
        assert call(gate.port, "POST", "/v1/fleet/push-object", chunk) == (200, b"ok")
        assert Upstream.seen == [f"POST /v1/fleet/push-object {chunk.decode()}"]
        status, body = call(gate.port, "POST", "/v1/fleet/push-object", b"0" * (8 * 1024 * 1024 + 1))
        assert status == 413 and b"at most 8388608 bytes" in body
        assert len(Upstream.seen) == 1
    finally:
        gate.stop()
        upstream.shutdown()


class SuperLink(http.server.BaseHTTPRequestHandler):
    """Answers a site's pull with no message until `pushed`, then with one; counts the pulls
    and the replies pushed."""

    pushed = False
    pulls = 0
    pushes = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"{}"
        if self.path == "/v1/fleet/push-messages":
            SuperLink.pushes += 1
        if self.path == "/v1/fleet/pull-messages":
            SuperLink.pulls += 1
            body = PullMessagesResponse(messages_list=[Message()] if SuperLink.pushed else []).SerializeToString()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_pull_that_finds_nothing_is_held_until_the_serverapp_pushes_and_the_serverapp_hears_of_replies(monkeypatch):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SuperLink)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gate = Gate("127.0.0.1", free_port(), upstream.server_address[1], notice_port=0)
    gate.start()
    notice = wakes.Notice(gate.notice_port)
    SuperLink.pushed, SuperLink.pulls = False, 0
    try:
        monkeypatch.setattr(gate_module, "HOLD_SECONDS", 60)
        answers: list = []
        pull = threading.Thread(target=lambda: answers.append(call(gate.port, "POST", "/v1/fleet/pull-messages", b"pull")))
        pull.start()
        pull.join(0.5)
        assert pull.is_alive() and SuperLink.pulls == 1, "the gate did not hold the pull that found nothing"
        SuperLink.pushed = True
        notice.pushed()
        pull.join(30)
        status, body = answers[0]
        assert status == 200 and len(PullMessagesResponse.FromString(body).messages_list) == 1
        assert SuperLink.pulls == 2

        # Without a push the pull is answered, empty, once the hold is over, and asked once.
        SuperLink.pushed, SuperLink.pulls = False, 0
        monkeypatch.setattr(gate_module, "HOLD_SECONDS", 0.2)
        status, body = call(gate.port, "POST", "/v1/fleet/pull-messages", b"pull")
        assert status == 200 and not PullMessagesResponse.FromString(body).messages_list and SuperLink.pulls == 1

        # A site's reply passed on wakes the ServerApp; other calls do not.
        assert not notice.wait(0)
        call(gate.port, "POST", "/v1/fleet/send-node-heartbeat", b"")
        assert not notice.wait(0.2)
        call(gate.port, "POST", "/v1/fleet/push-messages", b"reply")
        assert notice.wait(30)
    finally:
        notice.close()
        gate.stop()
        upstream.shutdown()


def test_with_large_replies_the_gate_lets_a_few_into_the_superlink_ahead_of_what_the_serverapp_took(monkeypatch):
    """Memory flat in the number of sites: asked to (a streamed strategy's large updates),
    the gate lets a site's reply into the SuperLink only while fewer than ADMITTED are waiting
    there for the ServerApp; the next goes in when the ServerApp says it took one, or after
    REPLY_HOLD_SECONDS. Unasked (small replies), every reply goes in at once."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SuperLink)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gate = Gate("127.0.0.1", free_port(), upstream.server_address[1], notice_port=0)
    gate.start()
    notice = wakes.Notice(gate.notice_port)
    SuperLink.pushes = 0
    monkeypatch.setattr(gate_module, "REPLY_HOLD_SECONDS", 60)

    def push() -> threading.Thread:
        pushing = threading.Thread(target=call, args=(gate.port, "POST", "/v1/fleet/push-messages", b"reply"))
        pushing.start()
        return pushing

    try:
        call(gate.port, "GET", "/health")  # the gate's loop is up
        notice.pushed(hold=True)
        wait_for(lambda: gate._holding, timeout=10, what="the gate told to hold replies back")
        for _ in range(gate_module.ADMITTED):
            push().join(30)
        assert SuperLink.pushes == gate_module.ADMITTED
        held = push()
        held.join(0.5)
        assert held.is_alive() and SuperLink.pushes == gate_module.ADMITTED, "a reply beyond ADMITTED went in"
        notice.taken()
        held.join(30)
        assert not held.is_alive() and SuperLink.pushes == gate_module.ADMITTED + 1

        # Nothing taken: the held reply goes in after REPLY_HOLD_SECONDS all the same.
        monkeypatch.setattr(gate_module, "REPLY_HOLD_SECONDS", 0.3)
        push().join(30)
        assert SuperLink.pushes == gate_module.ADMITTED + 2

        # A new exchange with small replies: nothing is held.
        notice.pushed()
        wait_for(lambda: not gate._holding, timeout=10, what="the gate told not to hold replies")
        pushing = [push() for _ in range(gate_module.ADMITTED + 2)]
        for thread in pushing:
            thread.join(30)
        assert SuperLink.pushes == 2 * gate_module.ADMITTED + 4
    finally:
        notice.close()
        gate.stop()
        upstream.shutdown()
