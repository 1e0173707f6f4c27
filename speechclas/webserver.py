"""``speechclas-web``: the prediction web page, served beside a running ``deepaas-run``.

The page (speechclas/web/) is static; it calls ``/v2/...`` on the server it
came from, and this server forwards those requests to DEEPaaS unchanged. So
the browser sees one origin (no cross-origin setup in DEEPaaS), and the page
exercises exactly the API that curl and the Swagger UI use.

Any web page the user visits can make the browser send requests here, so:

- a state-changing request (any method but GET, HEAD, OPTIONS: a prediction,
  starting or cancelling a training) is forwarded only when its ``Origin``
  (or, without one, its ``Referer``) is this server as the ``Host`` header
  names it; anything else is a 403 (cross-site request forgery);
- the ``Host`` header must name this server (a localhost name, the address
  it listens on, or one allowed with ``--allow-host``), so a site whose name
  is made to resolve to 127.0.0.1 cannot pass as this origin (DNS rebinding);
- only ``/v2/...`` is forwarded, exactly as received (raw path and query),
  and a path with ``.`` or ``..`` segments, however encoded, is refused:
  ``/v2/%2E%2E/ui`` must not reach DEEPaaS's ``/ui``;
- a body is read up to the API's own body limit (`Limits.client_max_size`)
  and answered 413 above it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from speechclas.limits import Limits, setting

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "http://127.0.0.1:5000"
# Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
# Answers pass through byte for byte (no decompression), so their Content-Length and -Encoding stay true.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Host")
)
# A request body is read whole (aiohttp decompresses it), then sent with its own length.
_NOT_FORWARDED_WITH_BODY = frozenset({"content-length", "content-encoding"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"
_WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_API_URL = web.AppKey("api_url", str)
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_ALLOWED_HOSTS = web.AppKey("allowed_hosts", frozenset)


def web_dir() -> Path:
    """The folder of index.html, app.js and style.css inside the installed package."""
    return Path(str(resources.files("speechclas") / "web"))


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(web_dir() / "index.html")


def _refusal(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _authority(host: str, scheme: str) -> tuple[str, int | None] | None:
    """(host name, port) of a ``Host`` header; the port None when it is the scheme's default.
    None for a header that is not a host[:port]."""
    try:
        parts = urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return parts.hostname, None if port == _DEFAULT_PORTS.get(scheme) else port


def same_origin(source: str, host: str, scheme: str) -> bool:
    """Whether `source` (an Origin or Referer) is the server that the ``Host`` header `host` names.

    Host name and port are compared (a default port written or not is the
    same). The scheme only decides the default port: behind a TLS proxy the
    page is https while the request arrives here over http.
    """
    try:
        parts = urlsplit(source)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False
    ours = _authority(host, scheme)
    return ours is not None and ours == (parts.hostname, None if port == _DEFAULT_PORTS[parts.scheme] else port)


def allowed_hosts(listen_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names this server answers to: localhost names, the address it listens on, `extra`
    (``*``: any, which gives up the protection against DNS rebinding)."""
    names = set(LOCAL_HOSTS) | {name.strip().strip("[]").lower() for name in extra if name.strip()}
    if listen_host not in _WILDCARD_ADDRESSES:
        names.add(listen_host.strip("[]").lower())
    return frozenset(names)


@web.middleware
async def _guard(request: web.Request, handler) -> web.StreamResponse:
    """Refuse a Host that is not ours, and a state-changing request that does not come from our page."""
    host = request.headers.get("Host", "")
    authority = _authority(host, request.scheme)
    allowed = request.app[_ALLOWED_HOSTS]
    if authority is None or (ANY_HOST not in allowed and authority[0] not in allowed):
        logger.warning("Refused a request for host %r (allowed: %s)", host, ", ".join(sorted(allowed)))
        return _refusal(403, f"this server does not answer to the host {host!r}; start speechclas-web with "
                             "--allow-host NAME to allow a name it is reached by")  # fmt: skip
    if request.method not in SAFE_METHODS:
        origin = request.headers.get("Origin")
        source = origin if origin is not None else request.headers.get("Referer")
        if source is None or not same_origin(source, host, request.scheme):
            what = f"Origin {origin!r}" if origin is not None else (
                f"Referer {source!r}" if source is not None else "no Origin or Referer header")
            logger.warning("Refused %s %s from %s", request.method, request.raw_path, what)
            return _refusal(403, f"{request.method} is accepted only from this server's own page "
                                 f"(http://{host}/); the request came with {what}")  # fmt: skip
    return await handler(request)


def _forwarded_path(raw_path: str) -> str | None:
    """`raw_path` (path and query, as received) if it may be forwarded: under /v2, no dot segments."""
    path = raw_path.partition("?")[0]
    if path != "/v2" and not path.startswith("/v2/"):
        return None
    segments = unquote(path).replace("\\", "/").split("/")
    return None if any(segment in (".", "..") for segment in segments) else raw_path


async def _forward(request: web.Request) -> web.StreamResponse:
    """Pass one ``/v2/...`` request to DEEPaaS, path and query as received, and its answer back streamed."""
    raw_path = _forwarded_path(request.raw_path)
    if raw_path is None:
        return _refusal(404, f"{request.raw_path!r} is not forwarded: only /v2/... paths without '.' or '..' "
                             "segments are")  # fmt: skip
    body = None
    if request.body_exists:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = request.client_max_size
            return _refusal(413, f"the request body is larger than {limit} bytes, the limit of uploads "
                                 f"({setting('max_audio_bytes').env}, {setting('detect_max_audio_bytes').env}) "
                                 "plus the form around them")  # fmt: skip
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in _HOP_BY_HOP and (body is None or k.lower() not in _NOT_FORWARDED_WITH_BODY)}
    target = URL(request.app[_API_URL] + raw_path, encoded=True)  # encoded: yarl must not normalise it
    try:
        async with request.app[_SESSION].request(
            request.method,
            target,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientConnectionError as exc:
        logger.warning("DEEPaaS at %s did not answer: %s", request.app[_API_URL], exc)
        return web.json_response(
            {"message": f"the DEEPaaS API at {request.app[_API_URL]} did not answer ({exc}); "
             "is deepaas-run running? Start it, or pass --api-url."},
            status=502,
        )


def make_app(
    api_url: str = DEFAULT_API_URL,
    timeout_s: float = 300.0,
    *,
    listen_host: str = "127.0.0.1",
    allow_hosts: Iterable[str] = (),
    client_max_size: int | None = None,
) -> web.Application:
    """The web page and the ``/v2`` forwarder to the DEEPaaS server at `api_url`.

    `listen_host` and `allow_hosts` are the names accepted in ``Host`` besides
    localhost's; `client_max_size` bounds request bodies (default: the
    operator's `Limits.client_max_size`, as ``speechclas-serve`` gives DEEPaaS).
    """
    if client_max_size is None:
        client_max_size = Limits.from_env().client_max_size()
    app = web.Application(client_max_size=client_max_size, middlewares=[_guard])
    app[_API_URL] = api_url.rstrip("/")
    app[_ALLOWED_HOSTS] = allowed_hosts(listen_host, allow_hosts)

    async def client_session(app: web.Application):
        # Predictions of large archives, or of the first request while a worker loads, can take a while.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False) as s:
            app[_SESSION] = s
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", web_dir(), show_index=False)
    app.router.add_route("*", "/v2/{tail:.*}", _forward)
    app.router.add_route("*", "/v2", _forward)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechclas-web",
        description="Serve the prediction web page (upload, URL, microphone) and forward its /v2 API "
        "calls to a running deepaas-run.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-url", default=DEFAULT_API_URL,
                        help=f"where deepaas-run listens (default: {DEFAULT_API_URL})")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name the page is reached by, besides localhost names and --host "
                        "(repeatable; '*' allows any and gives up the protection against DNS rebinding)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = make_app(args.api_url, listen_host=args.host, allow_hosts=args.allow_host)
    except ValueError as exc:  # an operator setting that cannot be used
        logger.error("%s", exc)
        return 2
    logger.info("Web page on http://%s:%d/ , API calls forwarded to %s; host names accepted: %s",
                args.host, args.port, args.api_url, ", ".join(sorted(app[_ALLOWED_HOSTS])))
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
