"""``speechclas-web``: the prediction web page, served beside a running ``deepaas-run``.

The page (speechclas/web/) is static; it calls ``/v2/...`` on the server it
came from, and this server forwards those requests to DEEPaaS unchanged. So
the browser sees one origin (no cross-origin setup in DEEPaaS), and the page
exercises exactly the API that curl and the Swagger UI use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "http://127.0.0.1:5000"
# Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
# Bodies pass through byte for byte (no decompression), so Content-Length and -Encoding stay true.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Host")
)
_API_URL = web.AppKey("api_url", str)
_SESSION = web.AppKey("session", aiohttp.ClientSession)


def web_dir() -> Path:
    """The folder of index.html, app.js and style.css inside the installed package."""
    return Path(str(resources.files("speechclas") / "web"))


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(web_dir() / "index.html")


async def _forward(request: web.Request) -> web.StreamResponse:
    """Pass one ``/v2/...`` request to DEEPaaS and its answer back, body streamed both ways."""
    target = request.app[_API_URL] + request.rel_url.path_qs
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    try:
        async with request.app[_SESSION].request(
            request.method,
            target,
            headers=headers,
            data=request.content if request.body_exists else None,
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


def make_app(api_url: str = DEFAULT_API_URL, timeout_s: float = 300.0) -> web.Application:
    """The web page and the ``/v2`` forwarder to the DEEPaaS server at `api_url`."""
    app = web.Application()
    app[_API_URL] = api_url.rstrip("/")

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
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("Web page on http://%s:%d/ , API calls forwarded to %s", args.host, args.port, args.api_url)
    web.run_app(make_app(args.api_url), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
