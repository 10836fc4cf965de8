"""The server's SuperLink: Flower's, each HTTP middleware layer applied only to the requests
it acts on (bouquet_workloads.superlink)."""

from __future__ import annotations

import asyncio
import importlib.metadata

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bouquet_workloads import flower, superlink


def test_flowers_middleware_is_the_pinned_list_and_another_is_refused():
    """The contract: flwr 1.41.0's SuperLink middleware, layer by layer, is what the scopes were
    read from. A list with a layer more, less or moved is refused, naming what it found."""
    from flwr.superlink.main import _get_middleware

    assert importlib.metadata.version("flwr") == "1.41.0", "bouquet_workloads.superlink is pinned to flwr 1.41.0: read its layers again"
    flowers = _get_middleware()
    wrapped = superlink.scoped(flowers)
    assert [m.cls for m in wrapped].count(superlink.Scoped) == 7
    assert [m.kwargs.get("layer", m.cls) for m in wrapped] == [m.cls for m in flowers]
    for changed in (flowers[1:], [flowers[1], flowers[0], *flowers[2:]], [*flowers, flowers[-1]]):
        with pytest.raises(RuntimeError, match="not flwr 1.41.0's: .*ControlSensitiveResponseMiddleware|not flwr 1.41.0's: \\['http_error"):
            superlink.scoped(changed)


def test_flowers_scoped_layers_check_the_path_they_are_scoped_to():
    """Each layer skipped off its paths passes any other request on untouched in flwr 1.41.0's
    own source: its dispatch checks the same prefix first (or, for tracing, the variable)."""
    import inspect

    from flwr.supercore.routers.runtime import tracing
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet import middlewares as fleet
    from flwr.superlink.routers.fleet import node_auth

    assert control._is_control_path("/v1/control/x") and not control._is_control_path("/v1/fleet/x")
    assert inspect.getsource(control._is_control_path).rstrip().endswith('return path.startswith("/v1/control/")')
    sensitive = {path for _, path in control.CONTROL_SENSITIVE_ROUTE_KEYS}
    assert sensitive and all(p.startswith(superlink.CONTROL) for p in sensitive)
    for layer in (control.ControlAuthenticationMiddleware, control.ControlLicenseMiddleware, control.ControlEventLogMiddleware):
        assert "if not _is_control_path(request.url.path)" in inspect.getsource(layer.dispatch) or (
            "or not _is_control_path(request.url.path)" in inspect.getsource(layer.dispatch)
        ), layer
    assert "if _is_control_sensitive_route(request):" in inspect.getsource(control.ControlSensitiveResponseMiddleware.dispatch)
    assert 'if request.url.path.startswith("/v1/fleet/") and' in inspect.getsource(node_auth.NodeAuthMiddleware.dispatch)
    assert 'if not request.url.path.startswith("/v1/fleet/"):' in inspect.getsource(fleet.FleetEventLogMiddleware.dispatch)
    assert 'os.getenv("FLWR_TRACING_ENABLED") != "1"' in inspect.getsource(tracing.RuntimeTracingMiddleware.dispatch)


class Seen(BaseHTTPMiddleware):
    """A layer that says it saw the request."""

    def __init__(self, app, name: str) -> None:
        super().__init__(app)
        self.name = name

    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["x-seen"] = ",".join(filter(None, [response.headers.get("x-seen"), self.name]))
        return response


def _post(app, path: str) -> str:
    """What the x-seen header says after app answers a POST of path (the path as sent, not
    normalized: as uvicorn hands it on)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [(b"host", b"127.0.0.1")],
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return dict(start["headers"]).get(b"x-seen", b"").decode()


def test_a_scoped_layer_sees_the_requests_under_its_path_and_no_other():
    app = Starlette(
        routes=[Route("/{path:path}", lambda request: PlainTextResponse(request.url.path), methods=["POST"])],
        middleware=[
            Middleware(Seen, name="always"),
            Middleware(superlink.Scoped, layer=Seen, acts_on=superlink._path_under(superlink.CONTROL), name="control"),
            Middleware(superlink.Scoped, layer=Seen, acts_on=superlink._path_under(superlink.FLEET), name="fleet"),
        ],
    )
    seen = {path: _post(app, path) for path in ("/v1/control/list-runs", "/v1/fleet/pull-object", "/v1/runtime/x")}
    assert seen == {"/v1/control/list-runs": "control,always", "/v1/fleet/pull-object": "fleet,always", "/v1/runtime/x": "always"}
    # A layer judges the path as Flower's layers do (Starlette's request.url.path), dots and all.
    assert _post(app, "/v1/control/../runtime/x") == "control,always"
    assert _post(app, "/v1/runtime/../control/x") == "always"
    assert _post(app, "//v1/control/x") == "always"  # Flower's own check: not a Control path either


@pytest.mark.slow
def test_the_real_superlink_still_applies_its_control_layers_to_control_requests(tmp_path):
    """The server's SuperLink process: a sensitive Control API answer still carries Flower's
    no-store headers (its outermost Control layer ran), a runtime API answer does not (it was
    skipped), and both are Flower's protobuf answers (its translation layer ran for each)."""
    processes = flower.Processes(tmp_path / "logs")
    port = flower.free_port()
    command = flower.superlink_command(port, flower.Tls(), authenticate_sites=False)
    assert command[1:3] == ["-m", "bouquet_workloads.superlink"]
    try:
        processes.start("server", command)
        flower.wait_healthy(port, flower.Tls(), 60, processes)
        headers = {"content-type": "application/protobuf"}
        control = httpx.post(f"http://127.0.0.1:{port}/v1/control/get-login-details", content=b"", headers=headers, timeout=30)
        runtime = httpx.post(f"http://127.0.0.1:{port}/v1/runtime/get-nodes", content=b"", headers=headers, timeout=30)
    finally:
        processes.stop()
    assert control.headers.get("cache-control") == "no-store" and control.headers.get("pragma") == "no-cache", control.headers
    assert "cache-control" not in runtime.headers, runtime.headers
    for answer in (control, runtime):
        assert answer.status_code < 500, (answer.status_code, answer.text)
