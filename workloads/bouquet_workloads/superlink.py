"""The server's SuperLink: Flower's own, each of its HTTP middlewares applied only to the
requests it acts on.

Flower 1.41's SuperLink passes every request through nine Starlette BaseHTTPMiddleware layers
(flwr.superlink.main._get_middleware), each a task group and a pair of memory streams around
the rest of the stack. Four of them act only on Control API paths (their first line checks
the path and passes anything else on), two only on Fleet API paths, and one (runtime tracing)
only while FLWR_TRACING_ENABLED is 1. A round is a hundred or so small requests from the sites
(Fleet API) and the ServerApp (runtime API): the layers that pass them on untouched were half
of the SuperLink's CPU time, and the SuperLink's CPU time was most of a small model's round.

Here each of those seven runs only for the requests it would act on, judged by the path it
would judge them by (Starlette's `request.url.path`, built from the request the same way), and
the others skip it. Nothing else changes: every request still passes Flower's error translation
and protobuf translation, every Fleet request its node authentication, every Control request
all four Control layers, in Flower's order. The middleware list is pinned to flwr 1.41.0's
(tests/workloads/test_superlink.py): another version's list is refused at start, not guessed at.

    python -m bouquet_workloads.superlink FLOWER-SUPERLINK-ARGS...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

CONTROL, FLEET = "/v1/control/", "/v1/fleet/"


def _path_under(prefix: str) -> Callable[[Scope], bool]:
    return lambda scope: HTTPConnection(scope).url.path.startswith(prefix)


def _tracing(scope: Scope) -> bool:
    return os.getenv("FLWR_TRACING_ENABLED") == "1"  # read per request, as Flower's layer reads it


# flwr 1.41.0's layers, outermost first: the name of each, and when it acts (None: always).
PINNED: tuple[tuple[str, Callable[[Scope], bool] | None], ...] = (
    ("ControlSensitiveResponseMiddleware", _path_under(CONTROL)),
    ("http_error_translator", None),
    ("ControlAuthenticationMiddleware", _path_under(CONTROL)),
    ("ControlLicenseMiddleware", _path_under(CONTROL)),
    ("ProtobufTranslationMiddleware", None),
    ("RuntimeTracingMiddleware", _tracing),
    ("ControlEventLogMiddleware", _path_under(CONTROL)),
    ("NodeAuthMiddleware", _path_under(FLEET)),
    ("FleetEventLogMiddleware", _path_under(FLEET)),
)


class Scoped:
    """An ASGI middleware that runs `layer` (a Starlette middleware class and its options)
    for the HTTP requests `acts_on` admits, and passes any other request straight on."""

    def __init__(self, app: ASGIApp, layer: type, acts_on: Callable[[Scope], bool], **options) -> None:
        self.app = app
        self.layer = layer(app, **options)
        self.acts_on = acts_on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.acts_on(scope):
            await self.layer(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _name(middleware: Middleware) -> str:
    dispatch = middleware.kwargs.get("dispatch")
    return dispatch.__name__ if dispatch is not None else middleware.cls.__name__


def scoped(middleware: list[Middleware]) -> list[Middleware]:
    """Flower's middleware list with each layer that acts on some requests only wrapped in
    Scoped. Raises RuntimeError when the list is not flwr 1.41.0's."""
    names = [_name(m) for m in middleware]
    if names != [name for name, _ in PINNED]:
        raise RuntimeError(f"Flower's SuperLink middleware is not flwr 1.41.0's: {names}")
    return [
        m if acts_on is None else Middleware(Scoped, layer=m.cls, acts_on=acts_on, **m.kwargs)
        for m, (_, acts_on) in zip(middleware, PINNED, strict=True)
    ]


def install() -> None:
    """Makes the SuperLink built in this process use the scoped middleware."""
    from flwr.superlink import main as superlink_main

    flowers = superlink_main._get_middleware
    superlink_main._get_middleware = lambda: scoped(flowers())


def main(argv: list[str] | None = None) -> int:
    install()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    return flower_superlink() or 0


if __name__ == "__main__":
    sys.exit(main())
