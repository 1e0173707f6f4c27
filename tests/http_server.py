"""A real HTTP server on 127.0.0.1 for tests that download things (fetch, archive, API).

``serve_directory`` serves a folder's files and, for chosen paths, custom
answers (redirects, error codes, slow or large bodies). ``routes`` is read on
every request, so a test may add routes that need the base URL after start.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

Route = Callable[[http.server.BaseHTTPRequestHandler], None]

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def redirect(location: str, status: int = 302) -> Route:
    """Answer ``status`` with a Location header (absolute or relative)."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def respond(
    body: bytes = b"",
    status: int = 200,
    *,
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
    delay: float = 0.0,
) -> Route:
    """Answer with a fixed body after ``delay`` seconds; ``content_length`` may lie."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header(
            "Content-Length", str(len(body) if content_length is None else content_length)
        )
        handler.end_headers()
        handler.wfile.write(body)

    return route


def stream(total_bytes: int, *, chunk_bytes: int = 64 * 1024, declare_length: bool = True) -> Route:
    """Answer ``total_bytes`` of zeros in chunks, optionally without a Content-Length."""

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declare_length:
            handler.send_header("Content-Length", str(total_bytes))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        sent = 0
        with contextlib.suppress(OSError):  # the client may hang up once it has seen enough
            while sent < total_bytes:
                size = min(chunk_bytes, total_bytes - sent)
                handler.wfile.write(b"\0" * size)
                sent += size

    return route


def drip(
    total_bytes: int, interval: float, *, declare_length: bool = True, in_headers: bool = False
) -> Route:
    """Answer one byte every ``interval`` seconds: of the body, or (``in_headers``) of the headers.

    Each byte comes well inside any read timeout, so only a total deadline ends it.
    """

    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 200 OK\r\n"
        head += f"Content-Length: {total_bytes}\r\n".encode() if declare_length else b"Connection: close\r\n"
        head += b"\r\n"
        handler.close_connection = True
        with contextlib.suppress(OSError):  # the client hangs up at its deadline
            if in_headers:
                for byte in head:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                    time.sleep(interval)
            else:
                handler.wfile.write(head)
            for _ in range(total_bytes):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                time.sleep(interval)

    return route


class _Handler(http.server.SimpleHTTPRequestHandler):
    routes: MutableMapping[str, Route]  # set per server by serve_directory

    def do_GET(self) -> None:
        route = self.routes.get(urlsplit(self.path).path)
        if route is None:
            super().do_GET()
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out or hang up on purpose are part of the tests


@contextlib.contextmanager
def serve_directory(
    path: Path | str, routes: MutableMapping[str, Route] | None = None
) -> Iterator[str]:
    """Serve ``path`` (and ``routes``, keyed by URL path) on 127.0.0.1; yield the base URL.

    The base URL has no trailing slash, e.g. ``http://127.0.0.1:40123``.
    """
    handler = type("Handler", (_Handler,), {"routes": routes if routes is not None else {}})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(path)))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
