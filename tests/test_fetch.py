"""speechclas.fetch against a real HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import pickle
import socket
import time

import pytest

from speechclas import fetch
from speechclas.fetch import FetchError, UrlPolicy, blocked_reason, fetch_url
from speechclas.limits import Limits
from tests.http_server import PROXY_VARS, drip, redirect, respond, serve_directory, stream

PUBLIC = "93.184.216.34"
WAV_BYTES = b"RIFF" + bytes(range(256)) * 4


@pytest.fixture(autouse=True)
def _direct_connections(monkeypatch):
    """Talk to 127.0.0.1 directly even if the machine has a proxy configured."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def site(tmp_path):
    """A server for a folder holding clip.wav; yields (base_url, routes, dest_dir)."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "clip.wav").write_bytes(WAV_BYTES)
    dest = tmp_path / "dest"
    dest.mkdir()
    routes = {}
    with serve_directory(served, routes) as base:
        yield base, routes, dest


def test_download_from_loopback_when_allowed(site):
    base, _, dest = site
    path = fetch_url(
        f"{base}/clip.wav", dest, max_bytes=10_000, allow_private=True, suffix=".wav", progress=True
    )
    assert path.parent == dest and path.suffix == ".wav"
    assert path.read_bytes() == WAV_BYTES
    again = fetch_url(f"{base}/clip.wav", dest, max_bytes=10_000, allow_private=True, suffix=".wav")
    assert again != path  # every download gets its own file


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_refused_by_default(site, host):
    base, _, dest = site
    url = base.replace("127.0.0.1", host) + "/clip.wav"
    with pytest.raises(FetchError, match="loopback address") as info:
        fetch_url(url, dest, max_bytes=10_000)
    assert "SPEECHCLAS_ALLOW_PRIVATE_URLS" in str(info.value)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/passwd", "got a file:// URL"),
        ("ftp://example.org/data.tar.gz", "got a ftp:// URL"),
        ("gopher://example.org/", "got a gopher:// URL"),
        ("example.org/clip.wav", "got no scheme"),
        ("not a url at all", "got no scheme"),
        ("", "got no scheme"),
        ("http://", "has no host name"),
        ("http://example.org:99999/x", "not a valid URL"),
    ],
)
def test_bad_urls_refused(tmp_path, url, expected):
    with pytest.raises(FetchError, match=expected):
        fetch_url(url, tmp_path, max_bytes=10, allow_private=True)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_status(site):
    base, _, dest = site
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{base}/missing.wav", dest, max_bytes=10_000, allow_private=True)
    assert list(dest.iterdir()) == []


def test_redirects_are_followed(site):
    base, routes, dest = site
    routes["/old"] = redirect("/moved")
    routes["/moved"] = redirect(f"{base}/clip.wav", status=301)
    path = fetch_url(f"{base}/old", dest, max_bytes=10_000, allow_private=True)
    assert path.read_bytes() == WAV_BYTES


def test_too_many_redirects(site):
    base, routes, dest = site
    routes["/loop"] = redirect("/loop")
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetch_url(f"{base}/loop", dest, max_bytes=10_000, allow_private=True, max_redirects=2)


def test_redirect_target_is_checked_again(site, monkeypatch):
    """First hop passes as public (patched resolver); its redirect to localhost must be refused."""
    base, routes, dest = site
    hits = []
    routes["/hop"] = redirect(base.replace("127.0.0.1", "localhost") + "/secret")
    routes["/secret"] = lambda handler: hits.append(handler.path)
    real_resolve = fetch._resolve
    monkeypatch.setattr(
        fetch,
        "_resolve",
        lambda host, port: [PUBLIC] if host == "127.0.0.1" else real_resolve(host, port),
    )
    # The connection really goes to 127.0.0.1, which the connect-time check would (rightly) refuse.
    monkeypatch.setattr(fetch, "_check_socket_peer", lambda sock: None)
    with pytest.raises(FetchError, match=r"localhost is a loopback address") as info:
        fetch_url(f"{base}/hop", dest, max_bytes=10_000)
    assert "redirected from" in str(info.value) and "resolves" not in str(info.value)
    assert hits == [] and list(dest.iterdir()) == []


def test_redirect_to_other_scheme_refused(site):
    base, routes, dest = site
    routes["/hop"] = redirect("file:///etc/passwd")
    with pytest.raises(FetchError, match="got a file:// URL"):
        fetch_url(f"{base}/hop", dest, max_bytes=10_000, allow_private=True)


def test_connection_to_unchecked_address_refused(site, monkeypatch):
    """DNS rebinding mitigation: a connection that lands on loopback is refused before the request."""
    base, routes, dest = site
    hits = []
    routes["/secret"] = lambda handler: hits.append(handler.path)
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: [PUBLIC])
    with pytest.raises(FetchError, match="went to a loopback address .*DNS changed") as info:
        fetch_url(f"{base}/secret", dest, max_bytes=10_000)
    assert "127.0.0.1," not in str(info.value)
    assert hits == [] and list(dest.iterdir()) == []


def test_unresolvable_host(tmp_path, monkeypatch):
    def fail(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch, "_resolve", fail)
    with pytest.raises(FetchError, match="could not reach .*cannot resolve 'nowhere.example'"):
        fetch_url("https://nowhere.example/data.zip", tmp_path, max_bytes=10)


@pytest.mark.parametrize("declare_length", [True, False])
def test_size_cap(site, declare_length):
    base, routes, dest = site
    routes["/big"] = stream(300_000, declare_length=declare_length)
    with pytest.raises(FetchError, match="larger than 100000 bytes"):
        fetch_url(f"{base}/big", dest, max_bytes=100_000, allow_private=True)
    assert list(dest.iterdir()) == []


def test_exact_size_is_allowed(site):
    base, routes, dest = site
    routes["/exact"] = stream(1000, declare_length=False)
    assert (
        fetch_url(f"{base}/exact", dest, max_bytes=1000, allow_private=True).stat().st_size == 1000
    )


def test_truncated_body_leaves_nothing(site):
    base, routes, dest = site
    routes["/short"] = respond(b"abc", content_length=1000)
    with pytest.raises(FetchError, match="interrupted"):
        fetch_url(f"{base}/short", dest, max_bytes=10_000, allow_private=True)
    assert list(dest.iterdir()) == []


def test_unreachable_port(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="could not reach"):
        fetch_url(
            f"http://127.0.0.1:{port}/x",
            tmp_path,
            max_bytes=10,
            allow_private=True,
            connect_timeout=0.5,
        )
    assert list(tmp_path.iterdir()) == []


def test_read_timeout(site):
    base, routes, dest = site
    routes["/slow"] = respond(b"late", delay=1.0)
    with pytest.raises(FetchError, match="could not reach .*timed out"):
        fetch_url(f"{base}/slow", dest, max_bytes=10, allow_private=True, read_timeout=0.2)
    assert list(dest.iterdir()) == []


def test_credentials_never_shown(tmp_path):
    with pytest.raises(FetchError) as info:
        fetch_url("http://user:hunter2@127.0.0.1:1/x", tmp_path, max_bytes=10)
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1:1/x" in str(info.value)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.10", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 wrapping 10.0.0.1
        ("not-an-ip", "not an IP address"),
    ],
)
def test_blocked_addresses(address, reason):
    assert blocked_reason(address) == reason


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address):
    assert blocked_reason(address) is None


def test_fetch_error_is_picklable():
    error = pickle.loads(pickle.dumps(FetchError("download of http://x failed")))
    assert isinstance(error, FetchError) and isinstance(error, ValueError)
    assert str(error) == "download of http://x failed"


# --- every SSRF form, without telling what a name resolves to ------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("localhost", "a loopback"),
        ("127.0.0.1", "a loopback"),
        ("127.1", "a loopback"),
        ("[::1]", "a loopback"),
        ("[::ffff:127.0.0.1]", "a loopback"),
        ("2130706433", "a loopback"),  # decimal 127.0.0.1
        ("0177.0.0.1", "a loopback"),  # octal
        ("0x7f.0.0.1", "a loopback"),  # hexadecimal
        ("0.0.0.0", "an unspecified"),
        ("169.254.169.254", "a link-local"),  # cloud metadata
    ],
)
def test_ssrf_forms_are_refused(site, host, reason):
    """Each would reach the live test server (or the machine itself) if the check let it through."""
    base, _, dest = site
    port = base.rsplit(":", 1)[1]
    with pytest.raises(FetchError, match=f"is not allowed: .* is {reason} address") as info:
        fetch_url(f"http://{host}:{port}/clip.wav", dest, max_bytes=10_000)
    message = str(info.value)
    assert "resolves" not in message and "SPEECHCLAS_ALLOW_PRIVATE_URLS" in message
    if host in ("localhost", "127.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1"):
        assert "127.0.0.1" not in message  # what the name stands for stays on the server
    assert list(dest.iterdir()) == []


def test_a_private_name_is_refused_without_its_address(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: [PUBLIC, "10.0.0.7"])
    with pytest.raises(FetchError, match="intranet.example is a private address") as info:
        fetch_url("http://intranet.example/clip.wav", tmp_path, max_bytes=10)
    assert "10.0.0.7" not in str(info.value)


# --- the host that is checked is the host that is connected --------------------------


@pytest.fixture
def recorded_lookups(site, monkeypatch):
    """Resolve straße.example's IDNA 2008 name to the test server; record every name looked up."""
    lookups = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host == "xn--strae-oqa.example":
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_an_international_name_is_checked_as_it_is_sent(site, recorded_lookups):
    base, _, dest = site
    url = base.replace("127.0.0.1", "straße.example") + "/clip.wav"
    with pytest.raises(FetchError, match="xn--strae-oqa.example is a loopback address"):
        fetch_url(url, dest, max_bytes=10_000)
    assert recorded_lookups == ["xn--strae-oqa.example"]  # not strasse.example (IDNA 2003)


def test_an_international_name_is_connected_as_it_was_checked(site, recorded_lookups):
    base, routes, dest = site
    hosts = []

    def record_host(handler):
        hosts.append(handler.headers["Host"])
        respond(WAV_BYTES)(handler)

    routes["/host"] = record_host
    url = base.replace("127.0.0.1", "STRASSE.example".lower().replace("ss", "ß")) + "/host"
    assert fetch_url(url, dest, max_bytes=10_000, allow_private=True).read_bytes() == WAV_BYTES
    port = base.rsplit(":", 1)[1]
    assert set(recorded_lookups) == {"xn--strae-oqa.example"}
    assert hosts == [f"xn--strae-oqa.example:{port}"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://%31%32%37.0.0.1/x", "may hold only letters, digits"),
        ("http://exa\u200dmple.org/x", "not a valid international domain name"),
        ("http://[::1]x/", "cannot tell its host"),
        ("http://[fe80::1%25eth0]/", "not a plain IPv6 address"),
    ],
)
def test_hosts_that_are_not_plain_names_are_refused(tmp_path, url, expected):
    with pytest.raises(FetchError, match=expected):
        fetch_url(url, tmp_path, max_bytes=10, allow_private=True)


# --- a total deadline, however slowly the bytes come ---------------------------------


@pytest.mark.parametrize(
    "route",
    [
        drip(1000, 0.2),
        drip(1000, 0.2, declare_length=False),  # the body would just end when cut
        drip(1000, 0.2, in_headers=True),
    ],
    ids=["body", "body-without-length", "headers"],
)
def test_slow_drip_is_cut_at_the_deadline(site, route):
    base, routes, dest = site
    routes["/drip"] = route
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"stopped: it took longer than the 1\.5 s allowed"):
        fetch_url(f"{base}/drip", dest, max_bytes=10_000, allow_private=True, read_timeout=1.0,
                  deadline_s=1.5)
    assert time.monotonic() - started < 15  # a hang bound: without a deadline it would take 200 s
    assert list(dest.iterdir()) == []


def test_policies_follow_the_operator_settings():
    limits = Limits.from_env({
        "SPEECHCLAS_URL_DEADLINE_S": "7", "SPEECHCLAS_DATA_URL_DEADLINE_S": "70",
        "SPEECHCLAS_MAX_AUDIO_BYTES": "100", "SPEECHCLAS_DATA_URL_MAX_BYTES": "1000",
        "SPEECHCLAS_URL_TRUST_ENV": "1", "SPEECHCLAS_URL_READ_TIMEOUT_S": "3",
    })
    audio, dataset = UrlPolicy.for_audio(limits), UrlPolicy.for_dataset(limits)
    assert (audio.max_bytes, audio.deadline_s, dataset.max_bytes, dataset.deadline_s) == (100, 7, 1000, 70)
    assert audio.trust_env and not audio.allow_private and dataset.read_timeout == 3
    assert UrlPolicy.for_audio(Limits.defaults()).trust_env is False


# --- nothing from the environment: proxies and .netrc ---------------------------------


@pytest.fixture
def proxy(tmp_path, monkeypatch):
    """A dummy HTTP proxy in HTTP(S)_PROXY that answers a GET of any /clip.wav itself."""
    with serve_directory(tmp_path, {"/clip.wav": respond(b"from the proxy")}) as proxy_url:
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(var, proxy_url)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        yield proxy_url


def test_environment_proxy_is_ignored(site, proxy):
    base, _, dest = site
    assert fetch_url(f"{base}/clip.wav", dest, max_bytes=10_000, allow_private=True).read_bytes() == WAV_BYTES
    # The operator may opt in; the same download then goes through the proxy.
    through = fetch_url(f"{base}/clip.wav", dest, max_bytes=10_000, allow_private=True, trust_env=True)
    assert through.read_bytes() == b"from the proxy"


def test_netrc_is_ignored(site, tmp_path, monkeypatch):
    base, routes, dest = site
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login operator password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    seen = []

    def record_auth(handler):
        seen.append(handler.headers.get("Authorization"))
        respond(WAV_BYTES)(handler)

    routes["/auth"] = record_auth
    fetch_url(f"{base}/auth", dest, max_bytes=10_000, allow_private=True)
    fetch_url(f"{base}/auth", dest, max_bytes=10_000, allow_private=True, trust_env=True)
    assert seen[0] is None and seen[1] is not None and seen[1].startswith("Basic ")
