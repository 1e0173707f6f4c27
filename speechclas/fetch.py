"""Download a user-supplied http(s) URL without opening a door into the server's network.

Training data URLs and prediction wav URLs come from API callers, so a naive
``requests.get(url)`` would let them make the server fetch internal services
(cloud metadata at 169.254.169.254, admin ports on localhost, the private
LAN). ``fetch_url`` therefore only speaks http/https, resolves every host
itself and refuses non-public addresses (unless the operator allows them),
follows redirects by hand so each hop is checked again, bounds time and size,
and never leaves a partial file behind.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

logger = logging.getLogger(__name__)

ALLOW_PRIVATE_ENV = "SPEECHCLAS_ALLOW_PRIVATE_URLS"
ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
# NAT64 prefix (RFC 6052): the last 32 bits are an IPv4 address that must be checked too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(ValueError):
    """A URL that could not or may not be downloaded; the message says which and why."""

    def __init__(self, message: str):
        super().__init__(message)


def env_allows_private() -> bool:
    """Whether the operator allows private/loopback URLs (``SPEECHCLAS_ALLOW_PRIVATE_URLS``).

    Read on each call so a deployment can change it without a code change; useful
    when datasets live on an internal file server.
    """
    value = os.environ.get(ALLOW_PRIVATE_ENV, "")
    return value.strip().lower() in {"1", "true", "yes"}


def blocked_reason(address: str) -> str | None:
    """Why an IP address must not be contacted (e.g. ``"loopback"``), or None if it is public.

    IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by
    the embedded address, since they can route to it.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that embed an IPv4 address route to it: judge by that address.
        embedded = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(str(embedded))
        if ip.sixtofour is not None:
            reason = blocked_reason(str(ip.sixtofour))
            if reason is not None:
                return reason
    for reason in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, carrier-grade NAT
        return "not globally routable"
    return None


def _resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to; a separate function so tests can substitute it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def redact_url(url: str) -> str:
    """The URL without user:password, so credentials never end up in logs or errors."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _describe(url: str, original: str) -> str:
    shown = redact_url(url)
    return shown if url == original else f"{shown} (redirected from {redact_url(original)})"


def _host_and_port(url: str, original: str) -> tuple[str, int]:
    """Refuse anything but an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"{_describe(url, original)} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        got = f"a {scheme}:// URL" if scheme else "no scheme"
        raise FetchError(
            f"{_describe(url, original)} is not allowed: only http:// and https:// URLs "
            f"can be downloaded, got {got}"
        )
    if not parts.hostname:
        raise FetchError(f"{_describe(url, original)} is not a valid URL: it has no host name")
    return parts.hostname, port or (443 if scheme == "https" else 80)


def _vet_host(url: str, original: str, host: str, port: int) -> None:
    """Resolve ``host`` and refuse it if any one of its addresses is not public.

    Every address is checked because the HTTP client may connect to any of them.
    """
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise FetchError(
            f"could not reach {_describe(url, original)}: cannot resolve {host!r} ({exc})"
        ) from None
    if not addresses:
        raise FetchError(f"could not reach {_describe(url, original)}: {host!r} has no address")
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None:
            where = f"{host} is" if address == host else f"{host} resolves to {address},"
            raise FetchError(
                f"{_describe(url, original)} is not allowed: {where} a {reason} address "
                f"(set {ALLOW_PRIVATE_ENV}=1 to allow internal URLs)"
            )


def check_url_allowed(url: str, allow_private: bool) -> None:
    """Refuse now, before any download starts, a URL that `fetch_url` would refuse for
    its scheme or its host's addresses (a training's data_url is checked when requested)."""
    host, port = _host_and_port(url, url)
    if not allow_private:
        _vet_host(url, url, host, port)


def _check_socket_peer(sock: socket.socket) -> None:
    """Refuse a freshly opened connection whose peer is not a public address.

    ``_vet_host`` and the HTTP client resolve the host separately, so a DNS
    server answering differently the second time (DNS rebinding) could point
    the connection at an internal address. This runs right after the TCP
    connect, before TLS or any request byte, and closes such a connection.
    Residual risk: the TCP handshake itself has reached that address, so its
    timing could still tell an attacker whether an internal port is open.
    """
    try:
        peer = sock.getpeername()[0]
    except OSError:
        return  # not connected after all; the request will fail on its own
    reason = blocked_reason(peer)
    if reason is not None:
        sock.close()
        raise FetchError(
            f"the connection went to {peer}, a {reason} address that was not checked "
            "(DNS changed between check and connect)"
        )


class _CheckedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_socket_peer(sock)
        return sock


class _CheckedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_socket_peer(sock)
        return sock


class _CheckedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _PublicOnlyAdapter(requests.adapters.HTTPAdapter):
    """Direct connections go through ``_check_socket_peer``.

    Connections through a proxy from the environment (HTTPS_PROXY...) are not
    checked there, since the peer is then the proxy; the proxy's own policy
    applies after ``_vet_host``.
    """

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _CheckedHTTPPool,
            "https": _CheckedHTTPSPool,
        }


def fetch_url(
    url: str,
    dest_dir: Path | str,
    *,
    max_bytes: int,
    allow_private: bool = False,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    max_redirects: int = 5,
    progress: bool = False,
    suffix: str = "",
) -> Path:
    """Download ``url`` into a new unique file inside ``dest_dir`` and return its path.

    The caller owns the returned file. Raises FetchError (and leaves no file
    behind) for a refused scheme or address, an unreachable host, a non-2xx
    answer, too many redirects, a timeout, or more than ``max_bytes`` of body.
    ``allow_private`` lifts only the address check (see ``env_allows_private``).
    """
    current = url
    with requests.Session() as session:
        if not allow_private:
            adapter = _PublicOnlyAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        for _hop in range(max_redirects + 1):
            host, port = _host_and_port(current, url)
            if not allow_private:
                _vet_host(current, url, host, port)
            response = _get(session, current, url, connect_timeout, read_timeout)
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(
                            f"{_describe(current, url)} answered HTTP {response.status_code} "
                            "without a Location to redirect to"
                        )
                    following = urljoin(current, location)
                    logger.info("%s redirects to %s", redact_url(current), redact_url(following))
                    current = following
                    continue
                if not 200 <= response.status_code < 300:
                    raise FetchError(
                        f"download of {_describe(current, url)} failed: the server answered "
                        f"HTTP {response.status_code} {response.reason or ''}".rstrip()
                    )
                return _save(response, Path(dest_dir), current, url, max_bytes, progress, suffix)
            finally:
                response.close()
    raise FetchError(f"download of {redact_url(url)} failed: more than {max_redirects} redirects")


def _get(
    session: requests.Session, url: str, original: str, connect_timeout: float, read_timeout: float
) -> requests.Response:
    try:
        return session.get(
            url,
            allow_redirects=False,
            stream=True,
            timeout=(connect_timeout, read_timeout),
            # A compressed body would be inflated by the client, beyond what we count.
            headers={"Accept-Encoding": "identity"},
        )
    except FetchError as exc:  # from _check_socket_peer
        raise FetchError(f"{_describe(url, original)} is not allowed: {exc}") from None
    except requests.Timeout as exc:
        raise FetchError(f"could not reach {_describe(url, original)}: timed out ({exc})") from None
    except requests.RequestException as exc:
        raise FetchError(f"could not reach {_describe(url, original)}: {exc}") from None


def _too_big(url: str, original: str, max_bytes: int) -> FetchError:
    return FetchError(
        f"download of {_describe(url, original)} refused: it is larger than {max_bytes} bytes"
    )


def _save(
    response: requests.Response,
    dest_dir: Path,
    url: str,
    original: str,
    max_bytes: int,
    progress: bool,
    suffix: str,
) -> Path:
    """Stream the body to a fresh temp file, enforcing ``max_bytes``; remove it on failure."""
    declared = response.headers.get("Content-Length", "")
    total = int(declared) if declared.isascii() and declared.isdigit() else None
    if total is not None and total > max_bytes:
        raise _too_big(url, original, max_bytes)

    from tqdm import tqdm  # only needed once a download really starts

    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest_dir, suffix=suffix)
    path = Path(name)
    received = 0
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(urlsplit(url).path).name or "download",
                disable=not progress,
            ) as bar,
        ):
            for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    raise _too_big(url, original, max_bytes)
                out.write(chunk)
                bar.update(len(chunk))
    except requests.RequestException as exc:
        path.unlink(missing_ok=True)
        raise FetchError(f"download of {_describe(url, original)} was interrupted: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s (%d bytes) to %s", redact_url(original), received, path)
    return path
