"""THE URL fetcher for images given as URLs (scoring.decode calls it), safe with untrusted input.

A request may name any URL, so the server must not become a proxy into its own network (SSRF):
- http and https only, no credentials in the URL;
- every address a host resolves to must be public: loopback, private, link-local (the cloud
  metadata service 169.254.169.254 included), shared, multicast, reserved and unspecified
  addresses are refused, after DNS resolution and again on every redirect (redirects are
  followed here, at most MMDET_MLFLOW_FETCH_MAX_REDIRECTS);
- the connection goes to the very address that was checked (no second DNS lookup an attacker
  could answer differently), while the Host header and TLS SNI/certificate check use the name;
- connect and read timeouts, one deadline per URL that covers everything (DNS, every connect
  attempt, the TLS handshake, the status line and headers, the body, redirects: a server that
  drips a byte every few seconds is cut off by a watchdog, not just by read timeouts), an
  optional tighter deadline from the caller (the budget of a whole request), and a byte cap.
``MMDET_MLFLOW_URL_ALLOWLIST`` (comma-separated host names, IP addresses or CIDR networks)
allows hosts or networks that would otherwise be refused, e.g. a storage account on a private
endpoint. Every refusal is an InputError (a 4xx) that says why. Error messages show URLs without
their query string or credentials, so SAS tokens never reach a response or a log.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from scoring import settings
from scoring.errors import InputError

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Deadline:
    """A point in time (time.monotonic) and what it stands for, to say so when it passes."""

    at: float
    what: str

    @classmethod
    def after(cls, seconds: float, what: str) -> "Deadline":
        return cls(time.monotonic() + seconds, what)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.remaining() <= 0


def url_deadline() -> Deadline:
    seconds = settings.FETCH_TOTAL_TIMEOUT.value()
    return Deadline.after(seconds,
                          f"took longer than {seconds:g} s ({settings.FETCH_TOTAL_TIMEOUT.source()})")


class FetchBudget:
    """Seconds that all of one request's URL fetches may take together. Only time spent
    fetching is counted: a request's rows are fetched between the model's forward passes, and
    a wall-clock deadline would spend the budget on those (64 URL rows of a large model on a
    CPU had their later rows refused though each fetch took milliseconds)."""

    def __init__(self, seconds: float, what: str):
        self.left = seconds
        self.what = what

    def deadline(self) -> Deadline:
        """The deadline of a fetch that starts now."""
        return Deadline.after(self.left, self.what)

    def spend(self, seconds: float) -> None:
        self.left -= seconds


def request_budget() -> FetchBudget:
    """The budget of all of one request's URLs together (``scoring.frame.score_frame`` makes one
    per served request)."""
    seconds = settings.FETCH_REQUEST_BUDGET.value()
    return FetchBudget(seconds, f"the request's image URLs took longer than {seconds:g} s in all "
                                f"({settings.FETCH_REQUEST_BUDGET.source()})")


def fetch_url(url: str, budget: FetchBudget | None = None) -> bytes:
    """The body of ``url`` (following redirects), or an InputError saying why not, within this
    URL's own deadline and what is left of ``budget`` (the request's), whichever comes first."""
    if budget is None:
        return _fetch(url, url_deadline())
    started = time.monotonic()
    try:
        return _fetch(url, min(url_deadline(), budget.deadline(), key=lambda d: d.at))
    finally:
        budget.spend(time.monotonic() - started)


def _fetch(url: str, deadline: Deadline) -> bytes:
    max_redirects = settings.FETCH_MAX_REDIRECTS.value()
    for _ in range(max_redirects + 1):
        if deadline.passed():
            raise InputError(f"fetching {display_url(url)} failed: {deadline.what}")
        target = checked_target(url, deadline)
        status, location, body = _get(target, deadline)
        if status in _REDIRECTS:
            if not location:
                raise InputError(f"fetching {display_url(url)} failed: HTTP {status} without a Location")
            url = urljoin(url, location)
            continue
        if status != 200:
            raise InputError(f"fetching {display_url(url)} failed: HTTP {status}")
        return body
    raise InputError(f"fetching {display_url(url)} failed: more than {max_redirects} redirects")


@dataclass(frozen=True)
class Target:
    """A URL whose host has been resolved and checked: connect only to ``addresses``."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]


def checked_target(url: str, deadline: Deadline | None = None) -> Target:
    """Parse ``url``, resolve its host and check every address; refuse with an InputError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InputError(f"not a valid URL ({err}): {display_url(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"only http(s) URLs with a host can be fetched, got {display_url(url)}")
    if parts.username is not None or parts.password is not None:
        raise InputError(f"URLs with credentials are not fetched: {display_url(url)}")
    host = parts.hostname.lower()
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve(host, port, url, deadline or url_deadline())
    allowlist = Allowlist.from_env()
    if not allowlist.allows_host(host):
        for address in addresses:
            reason = refusal_reason(address)
            if reason and not allowlist.allows_address(address):
                shown = host if host == address else f"{host} (resolves to {address})"
                raise InputError(
                    f"refusing to fetch {display_url(url)}: {shown} is a {reason} address; "
                    f"only public hosts are fetched unless listed in {settings.URL_ALLOWLIST.source()}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port, path, tuple(addresses))


def refusal_reason(address: str) -> str | None:
    """Why a server must not fetch from this IP address, or None when it is public."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),  # includes 169.254.169.254, the metadata service
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-global", not ip.is_global),  # e.g. 100.64.0.0/10 (carrier-grade NAT)
    )
    return next((name for name, hit in checks if hit), None)


@dataclass(frozen=True)
class Allowlist:
    hosts: frozenset[str]
    networks: tuple

    @classmethod
    def from_env(cls) -> "Allowlist":
        hosts, networks = set(), []
        for entry in settings.URL_ALLOWLIST.value():
            entry = entry.lower()
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.rstrip(".") in self.hosts

    def allows_address(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in self.networks)


def display_url(url: str) -> str:
    """``url`` without credentials or query (SAS tokens, signatures), short enough to show."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        shown = f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")
    except ValueError:
        shown = str(url)
    return repr(shown if len(shown) <= 200 else shown[:200] + "...")


def _resolve(host: str, port: int, url: str, deadline: Deadline) -> list[str]:
    """getaddrinfo within the deadline: the system resolver has no timeout of its own that we
    control, so it runs in a daemon thread we stop waiting for."""
    outcome: dict = {}

    def lookup():
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as err:
            outcome["error"] = err

    worker = threading.Thread(target=lookup, name="mmdet-mlflow-dns", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline.remaining()))
    if worker.is_alive():
        raise InputError(f"fetching {display_url(url)} failed: {deadline.what} (resolving {host!r})")
    if "error" in outcome:
        raise InputError(f"fetching {display_url(url)} failed: cannot resolve {host!r} "
                         f"({outcome['error']})") from None
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in outcome["infos"]))
    if not addresses:
        raise InputError(f"fetching {display_url(url)} failed: {host!r} has no address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to one checked address; the Host header still names the host."""

    def __init__(self, target: Target, address: str, deadline: Deadline):
        super().__init__(target.host, target.port, timeout=settings.FETCH_TIMEOUT.value())
        self._address = address
        self._deadline = deadline

    def connect(self):
        timeout = min(settings.FETCH_CONNECT_TIMEOUT.value(), max(0.001, self._deadline.remaining()))
        self.sock = socket.create_connection((self._address, self.port), timeout)
        self.sock.settimeout(self.timeout)  # the read timeout from here on
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self):
        super().connect()
        # SNI and the certificate check use the host name, not the address we connected to.
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def _get(target: Target, deadline: Deadline) -> tuple[int, str | None, bytes]:
    connection_class = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    shown = display_url(target.url)
    last_error = None
    for address in target.addresses:  # e.g. IPv6 unreachable: try the next checked address
        if deadline.passed():
            raise InputError(f"fetching {shown} failed: {deadline.what}")
        connection = connection_class(target, address, deadline)
        watchdog = _Watchdog(connection, deadline)
        try:
            try:
                connection.connect()
            except OSError as err:
                last_error = err
                continue
            return _request(connection, target, deadline, shown)
        except (OSError, http.client.HTTPException) as err:
            if watchdog.fired or deadline.passed():
                raise InputError(f"fetching {shown} failed: {deadline.what}") from None
            reason = "timed out" if isinstance(err, (socket.timeout, TimeoutError)) else err
            raise InputError(f"fetching {shown} failed: {reason}") from None
        finally:
            watchdog.cancel()
            connection.close()
    if deadline.passed():
        raise InputError(f"fetching {shown} failed: {deadline.what}")
    reason = "timed out" if isinstance(last_error, (socket.timeout, TimeoutError)) else last_error
    raise InputError(f"fetching {shown} failed: cannot connect ({reason})")


class _Watchdog:
    """Shuts the connection's socket down when the deadline passes, wherever the exchange is
    (TLS handshake, status line, headers, body): read timeouts alone restart with every byte."""

    def __init__(self, connection: http.client.HTTPConnection, deadline: Deadline):
        self.connection = connection
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline.remaining()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self):
        self.fired = True
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self):
        self._timer.cancel()


_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def _request(connection, target: Target, deadline: Deadline, shown: str):
    connection.request("GET", target.path, headers={"User-Agent": "mmdet-mlflow",
                                                    "Accept": "image/*, */*;q=0.5",
                                                    "Accept-Encoding": "identity"})
    response = connection.getresponse()
    if response.status != 200:
        return response.status, response.getheader("Location"), b""
    limit = settings.MAX_DOWNLOAD_BYTES.value()
    declared = response.getheader("Content-Length")
    if declared and _DIGITS.fullmatch(declared.strip()) and int(declared) > limit:
        raise InputError(f"{shown} is {int(declared)} bytes, over the limit of {limit} "
                         f"({settings.MAX_DOWNLOAD_BYTES.source()})")
    chunks, size = [], 0
    while True:
        if deadline.passed():
            raise InputError(f"fetching {shown} failed: {deadline.what}")
        chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise InputError(f"{shown} is larger than {limit} bytes ({settings.MAX_DOWNLOAD_BYTES.source()})")
        chunks.append(chunk)
    return 200, None, b"".join(chunks)
