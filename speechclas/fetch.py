"""Download a user-supplied http(s) URL without opening a door into the server's network.

Training data URLs and prediction wav URLs come from API callers, so a naive
``requests.get(url)`` would let them make the server fetch internal services
(cloud metadata at 169.254.169.254, admin ports on localhost, the private
LAN). ``fetch_url`` therefore only speaks http/https, writes the host once
in the ASCII form the HTTP client sends, resolves it itself and refuses
non-public addresses (unless the operator allows them), checks the address
each connection really reached, follows redirects by hand so each hop is
checked again, ignores proxies and .netrc from the environment (unless the
operator opts in), bounds the size and the whole download's time, and never
leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import idna
import requests
import requests.adapters
import urllib3
import urllib3.connection

from speechclas.limits import Limits, setting

logger = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
# NAT64 prefix (RFC 6052): the last 32 bits are an IPv4 address that must be checked too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A host name as it goes on the wire: ASCII letters, digits, '-', '_' and dots (IDNA already applied).
_ASCII_HOST = re.compile(r"^[a-z0-9_.-]+$")
# The host and port part of a netloc: a bracketed IPv6 literal or a name, then maybe ":port".
_HOST_PORT = re.compile(r"^(\[[^\[\]]*\]|[^:\[\]]*)(:[0-9]*)?$")
_REASON_PHRASES = {"not globally routable": "not a globally routable address"}


class FetchError(ValueError):
    """A URL that could not or may not be downloaded; the message says which and why."""

    def __init__(self, message: str):
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    """What one download may reach and how large and long it may be (fetch_url's keywords)."""

    max_bytes: int
    allow_private: bool = False
    trust_env: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    deadline_s: float = 60.0

    @classmethod
    def for_audio(cls, limits: Limits) -> UrlPolicy:
        """A predict URL: one audio file."""
        return cls._from_limits(limits, limits.max_audio_bytes, limits.url_deadline_s)

    @classmethod
    def for_dataset(cls, limits: Limits) -> UrlPolicy:
        """A training's ``data_url``: one dataset archive."""
        return cls._from_limits(limits, limits.data_url_max_bytes, limits.data_url_deadline_s)

    @classmethod
    def _from_limits(cls, limits: Limits, max_bytes: int, deadline_s: float) -> UrlPolicy:
        return cls(
            max_bytes=max_bytes,
            allow_private=limits.allow_private_urls,
            trust_env=limits.url_trust_env,
            connect_timeout=limits.url_connect_timeout_s,
            read_timeout=limits.url_read_timeout_s,
            deadline_s=deadline_s,
        )

    def kwargs(self) -> dict:
        """The keywords of `fetch_url`."""
        return dataclasses.asdict(self)


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


def _a_reason(reason: str) -> str:
    """``"a loopback address"``, ``"an unspecified address"``..., for messages."""
    if reason in _REASON_PHRASES:
        return _REASON_PHRASES[reason]
    article = "an" if reason[0] in "aeiou" else "a"
    return f"{article} {reason} address"


def _refusal_hint() -> str:
    return f"(set {setting('allow_private_urls').env}=1 to allow internal URLs)"


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


def _ascii_host(host: str, where: str) -> str:
    """``host`` exactly as the HTTP client will send and resolve it.

    A non-ASCII name is encoded as requests encodes it (IDNA 2008 with UTS 46
    mapping: ``straße`` becomes ``xn--strae-oqa``), whereas the resolver would
    use IDNA 2003 (``strasse``); from here on only the encoded name is used,
    for the check and for the request. Anything else that is not a plain
    ASCII name or an IP literal is refused.
    """
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise FetchError(
                f"{where} is not a valid URL: its host name is not a valid international "
                f"domain name ({exc})"
            ) from None
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = None
        if host is None or "%" in host:
            raise FetchError(f"{where} is not a valid URL: its host is not a plain IPv6 address")
        return host
    if not _ASCII_HOST.match(host):
        raise FetchError(
            f"{where} is not a valid URL: the host name may hold only letters, digits, '-', "
            "'_' and '.'"
        )
    return host


def normalise_url(url: str, where: str | None = None) -> tuple[str, str, int]:
    """(URL with the host as sent on the wire, that host, port) of an absolute http(s) URL.

    Refuses other schemes, URLs without a host and hosts that are not plain
    ASCII names or IP literals after IDNA encoding. `where` names the URL in
    messages (default: the URL without credentials).
    """
    where = redact_url(url) if where is None else where
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"{where} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        got = f"a {scheme}:// URL" if scheme else "no scheme"
        raise FetchError(
            f"{where} is not allowed: only http:// and https:// URLs can be downloaded, got {got}"
        )
    if not parts.hostname:
        raise FetchError(f"{where} is not a valid URL: it has no host name")
    userinfo, at, host_port = parts.netloc.rpartition("@")
    if not _HOST_PORT.match(host_port):
        raise FetchError(f"{where} is not a valid URL: cannot tell its host from {host_port!r}")
    host = _ascii_host(parts.hostname, where)
    netloc = f"{userinfo}{at}{f'[{host}]' if ':' in host else host}"
    if port is not None:
        netloc = f"{netloc}:{port}"
    normalised = urlunsplit(parts._replace(scheme=scheme, netloc=netloc))
    return normalised, host, port or (443 if scheme == "https" else 80)


def _vet_host(where: str, host: str, port: int) -> None:
    """Resolve ``host`` and refuse it if any one of its addresses is not public.

    Every address is checked because the HTTP client may connect to any of
    them. The message never says what the name resolved to: that would tell
    a caller about the server's internal network.
    """
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise FetchError(
            f"could not reach {where}: cannot resolve {host!r} ({exc})"
        ) from None
    if not addresses:
        raise FetchError(f"could not reach {where}: {host!r} has no address")
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None:
            raise FetchError(
                f"{where} is not allowed: {host} is {_a_reason(reason)} {_refusal_hint()}"
            )


def check_url_allowed(url: str, allow_private: bool) -> None:
    """Refuse now, before any download starts, a URL that `fetch_url` would refuse for
    its scheme or its host's addresses (a training's data_url is checked when requested)."""
    _sent, host, port = normalise_url(url)
    if not allow_private:
        _vet_host(redact_url(url), host, port)


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
            f"the connection went to {_a_reason(reason)} that was not checked "
            "(DNS changed between check and connect)"
        )


class _Deadline:
    """Cuts every connection of one download once its total time is up.

    The client's timeouts bound each connect and each read, so a server that
    sends a byte just inside the read timeout could hold a download for ever.
    A timer shuts the sockets down, which wakes a read blocked in another
    thread; whoever then sees the failure asks `expired` to say why.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                sock.close()
                raise OSError("the download's deadline has passed")
            self._sockets.append(sock)

    def _cut(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def error(self, where: str) -> FetchError:
        return FetchError(
            f"download of {where} stopped: it took longer than the "
            f"{self.seconds:g} s allowed for a whole download"
        )


def _pool_classes(deadline: _Deadline, check_peer: bool) -> dict[str, type]:
    """urllib3 pool classes whose connections are watched by `deadline` and, if asked, peer-checked."""

    def guarded(base: type) -> type:
        def _new_conn(self) -> socket.socket:
            sock = base._new_conn(self)
            deadline.watch(sock)
            if check_peer:
                _check_socket_peer(sock)
            return sock

        return type(f"Guarded{base.__name__}", (base,), {"_new_conn": _new_conn})

    return {
        "http": type("GuardedHTTPPool", (urllib3.HTTPConnectionPool,),
                     {"ConnectionCls": guarded(urllib3.connection.HTTPConnection)}),
        "https": type("GuardedHTTPSPool", (urllib3.HTTPSConnectionPool,),
                      {"ConnectionCls": guarded(urllib3.connection.HTTPSConnection)}),
    }


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """Every connection is cut at the deadline; direct ones are also peer-checked.

    A connection through a proxy (only with ``trust_env``) is not peer-checked,
    since the peer is then the proxy; the proxy's own policy applies after
    ``_vet_host``.
    """

    def __init__(self, deadline: _Deadline, check_peer: bool):
        self._direct_pools = _pool_classes(deadline, check_peer)
        self._proxied_pools = _pool_classes(deadline, check_peer=False)
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._direct_pools

    def proxy_manager_for(self, proxy: str, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = self._proxied_pools
        return manager


def fetch_url(
    url: str,
    dest_dir: Path | str,
    *,
    max_bytes: int,
    allow_private: bool = False,
    trust_env: bool = False,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    deadline_s: float = 60.0,
    max_redirects: int = 5,
    progress: bool = False,
    suffix: str = "",
) -> Path:
    """Download ``url`` into a new unique file inside ``dest_dir`` and return its path.

    The caller owns the returned file. Raises FetchError (and leaves no file
    behind) for a refused scheme, host or address, an unreachable host, a
    non-2xx answer, too many redirects, a timeout, more than ``deadline_s``
    for the whole download, or more than ``max_bytes`` of body.
    ``allow_private`` lifts only the address check; ``trust_env`` lets proxy
    settings and .netrc from the environment apply. `UrlPolicy` derives all
    of these from the operator's `Limits`.
    """
    current = url
    with _Deadline(deadline_s) as deadline, requests.Session() as session:
        session.trust_env = trust_env
        adapter = _GuardedAdapter(deadline, check_peer=not allow_private)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        for _hop in range(max_redirects + 1):
            where = _describe(current, url)
            request_url, host, port = normalise_url(current, where)
            if not allow_private:
                _vet_host(where, host, port)
            response = _get(session, request_url, where, connect_timeout, read_timeout, deadline)
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(
                            f"{where} answered HTTP {response.status_code} without a Location "
                            "to redirect to"
                        )
                    following = urljoin(request_url, location)
                    logger.info("%s redirects to %s", redact_url(current), redact_url(following))
                    current = following
                    continue
                if not 200 <= response.status_code < 300:
                    raise FetchError(
                        f"download of {where} failed: the server answered "
                        f"HTTP {response.status_code} {response.reason or ''}".rstrip()
                    )
                return _save(response, Path(dest_dir), where, max_bytes, progress, suffix, deadline)
            finally:
                response.close()
    raise FetchError(f"download of {redact_url(url)} failed: more than {max_redirects} redirects")


def _get(
    session: requests.Session,
    url: str,
    where: str,
    connect_timeout: float,
    read_timeout: float,
    deadline: _Deadline,
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
    except (FetchError, requests.RequestException) as exc:
        if deadline.expired:
            raise deadline.error(where) from None
        if isinstance(exc, FetchError):  # from _check_socket_peer
            raise FetchError(f"{where} is not allowed: {exc}") from None
        if isinstance(exc, requests.Timeout):
            raise FetchError(f"could not reach {where}: timed out ({exc})") from None
        raise FetchError(f"could not reach {where}: {exc}") from None


def _too_big(where: str, max_bytes: int) -> FetchError:
    return FetchError(f"download of {where} refused: it is larger than {max_bytes} bytes")


def _save(
    response: requests.Response,
    dest_dir: Path,
    where: str,
    max_bytes: int,
    progress: bool,
    suffix: str,
    deadline: _Deadline,
) -> Path:
    """Stream the body to a fresh temp file, enforcing ``max_bytes``; remove it on failure."""
    declared = response.headers.get("Content-Length", "")
    total = int(declared) if declared.isascii() and declared.isdigit() else None
    if total is not None and total > max_bytes:
        raise _too_big(where, max_bytes)

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
                desc=Path(urlsplit(response.url).path).name or "download",
                disable=not progress,
            ) as bar,
        ):
            for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    raise _too_big(where, max_bytes)
                out.write(chunk)
                bar.update(len(chunk))
        if deadline.expired:  # a body without Content-Length just ends when its socket is cut
            raise deadline.error(where)
    except requests.RequestException as exc:
        path.unlink(missing_ok=True)
        if deadline.expired:
            raise deadline.error(where) from None
        raise FetchError(f"download of {where} was interrupted: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s (%d bytes) to %s", where, received, path)
    return path
