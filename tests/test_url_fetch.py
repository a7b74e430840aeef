"""The URL fetcher against a real HTTP server on 127.0.0.1: allow-listed fetches, redirects,
SSRF refusals (checked before any connection is made), size cap and timeouts."""
from __future__ import annotations

import http.server
import socket
import sys
import threading
import time

import numpy as np
import pytest
from slow_server import slow_server as serving

from scoring import fetch, settings
from scoring.decode import decode_image
from scoring.errors import InputError

PNG_SIDE = 24

# Every address this process connects to, recorded by a CPython audit hook (it sees the real
# socket.connect calls; nothing is patched). Tests assert refused hosts never appear here.
CONNECTS: list = []


def _audit(event, args):
    if event == "socket.connect":
        CONNECTS.append(args[1])


sys.addaudithook(_audit)


def _png() -> bytes:
    import cv2

    image = np.zeros((PNG_SIDE, PNG_SIDE, 3), np.uint8)
    image[4:12, 4:20] = (0, 0, 255)
    return cv2.imencode(".png", image)[1].tobytes()


class Handler(http.server.BaseHTTPRequestHandler):
    png = _png()
    hosts_seen: list = []  # the Host header of every request

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.hosts_seen.append(self.headers["Host"])
        path = self.path.split("?")[0]
        if path == "/img.png":
            self._send(200, self.png, {"Content-Type": "image/png"})
        elif path.startswith("/redirect/"):
            self._send(302, b"", {"Location": {
                "ok": "/img.png",
                "private": "http://10.11.12.13/img.png",
                "metadata": "http://169.254.169.254/latest/meta-data/",
                "loop": "/redirect/loop",
            }[path.split("/")[2]]})
        elif path == "/big-declared":
            self._send(200, b"x" * 2048, {"Content-Type": "image/png"})
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            time.sleep(2)
            self._send(200, self.png, {})
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        else:
            self._send(404, b"not here", {})

    def _send(self, status, body, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the client hanging up on /slow and /drip is the point of those routes


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, "127.0.0.0/8")


def _refused(url: str, reason: str, via_local_server: bool = False) -> InputError:
    """Fetching ``url`` is refused for ``reason`` without connecting anywhere (but to the local
    test server, for a refused redirect target)."""
    before = len(CONNECTS)
    with pytest.raises(InputError, match=reason) as err:
        fetch.fetch_url(url)
    connected = CONNECTS[before:]
    if via_local_server:
        connected = [address for address in connected if address[0] != "127.0.0.1"]
    assert connected == [], f"connected to {connected} before refusing"
    return err.value


def test_allow_listed_local_server_serves_an_image(server, allow_loopback):
    assert fetch.fetch_url(f"{server}/img.png") == Handler.png
    image = decode_image(f"{server}/img.png?v=1", row=3)  # the decoder fetches through it
    assert image.shape == (PNG_SIDE, PNG_SIDE, 3) and tuple(image[5, 5]) == (0, 0, 255)


def test_allowlist_by_host_name(server, monkeypatch):
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, "localhost")
    port = server.rsplit(":", 1)[1]
    assert fetch.fetch_url(f"http://localhost:{port}/img.png") == Handler.png
    _refused(f"{server}/img.png", "loopback")  # the name is allowed, the bare address is not


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:9/img.png", "127.0.0.1 is a loopback address"),
    ("http://10.0.0.1/img.png", "10.0.0.1 is a private address"),
    ("http://192.168.1.20/img.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://[::1]/img.png", "loopback"),
    ("http://[::ffff:169.254.169.254]/x", "link-local"),
    ("http://0.0.0.0/img.png", "unspecified"),
    ("http://224.0.0.1/img.png", "multicast"),
    ("http://240.0.0.1/img.png", "reserved"),
    ("http://100.64.0.1/img.png", "non-global"),
    ("http://localhost:9/img.png", r"localhost \(resolves to (127.0.0.1|::1)\) is a loopback"),
])
def test_non_public_hosts_are_refused_before_connecting(url, reason):
    err = _refused(url, reason)
    assert settings.URL_ALLOWLIST.env in str(err)


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/img.png", "only http"),
    ("file:///etc/passwd", "only http"),
    ("http:///img.png", "only http"),
    ("http://user:secret@example.com/img.png", "credentials"),
    ("http://example.com:99999/img.png", "not a valid URL"),
])
def test_other_schemes_and_malformed_urls_are_refused(url, reason):
    err = _refused(url, reason)
    assert "secret" not in str(err)


def test_refusal_message_hides_query_strings():
    err = _refused("http://10.0.0.1/img.png?sv=2024&sig=SECRETSIG", "private")
    assert "SECRETSIG" not in str(err) and "?..." in str(err)


def test_redirects_are_followed_and_checked_every_hop(server, allow_loopback):
    assert fetch.fetch_url(f"{server}/redirect/ok") == Handler.png
    err = _refused(f"{server}/redirect/private", "10.11.12.13 is a private address", True)
    assert "'http://10.11.12.13/img.png'" in str(err)
    _refused(f"{server}/redirect/metadata", "169.254.169.254 is a link-local address", True)
    with pytest.raises(InputError, match=f"more than {settings.FETCH_MAX_REDIRECTS.default} redirects"):
        fetch.fetch_url(f"{server}/redirect/loop")


def test_connects_to_the_checked_address_with_the_host_header_of_the_name(server, monkeypatch):
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, "localhost")
    port = server.rsplit(":", 1)[1]
    target = fetch.checked_target(f"http://localhost:{port}/img.png")
    before = len(CONNECTS)
    fetch.fetch_url(f"http://localhost:{port}/img.png")
    connected = {address[0] for address in CONNECTS[before:]}
    assert connected and connected <= set(target.addresses)
    assert Handler.hosts_seen[-1] == f"localhost:{port}"


def _certificate(tmp_path, name: str):
    """A self-signed certificate for ``name`` (the test's own CA), as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("cert_name, ok", [("localhost", True), ("somewhere.else", False)])
def test_https_uses_the_host_name_for_sni_and_the_certificate(tmp_path, monkeypatch, cert_name, ok):
    """Connected to the checked address, TLS still sends the name (SNI) and verifies the
    certificate against it."""
    import ssl

    cert_file, key_file = _certificate(tmp_path, cert_name)
    server_names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # trust only the test's certificate
    monkeypatch.setenv(settings.URL_ALLOWLIST.env, "localhost")
    url = f"https://localhost:{httpd.server_address[1]}/img.png"
    try:
        if ok:
            assert fetch.fetch_url(url) == Handler.png
        else:
            with pytest.raises(InputError, match="certificate"):
                fetch.fetch_url(url)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "localhost" in server_names


def test_http_errors_are_input_errors(server, allow_loopback):
    with pytest.raises(InputError, match="HTTP 404"):
        fetch.fetch_url(f"{server}/missing.png")


def test_size_cap(server, allow_loopback, monkeypatch):
    monkeypatch.setenv(settings.MAX_DOWNLOAD_BYTES.env, "1000")
    with pytest.raises(InputError, match="2048 bytes, over the limit of 1000"):
        fetch.fetch_url(f"{server}/big-declared")
    with pytest.raises(InputError, match="larger than 1000 bytes"):
        fetch.fetch_url(f"{server}/big-chunked")


def test_read_timeout(server, allow_loopback, monkeypatch):
    monkeypatch.setenv(settings.FETCH_TIMEOUT.env, "0.3")
    start = time.monotonic()
    with pytest.raises(InputError, match="timed out"):
        fetch.fetch_url(f"{server}/slow")
    assert time.monotonic() - start < 1.5


def test_total_deadline_stops_a_slow_drip(server, allow_loopback, monkeypatch):
    monkeypatch.setenv(settings.FETCH_TOTAL_TIMEOUT.env, "0.8")
    with pytest.raises(InputError, match="took longer than 0.8 s"):
        fetch.fetch_url(f"{server}/drip")


def test_connect_failure_is_an_input_error(allow_loopback):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match="cannot connect"):
        fetch.fetch_url(f"http://127.0.0.1:{port}/img.png")


# One deadline per URL, one budget per request

@pytest.fixture(scope="module")
def slow_server():
    with serving() as url:
        yield url


def test_headers_dripped_slowly_are_cut_at_the_url_deadline(slow_server, allow_loopback, monkeypatch):
    from scoring.fetch import fetch_url

    monkeypatch.setenv(settings.FETCH_TOTAL_TIMEOUT.env, "1")
    with pytest.raises(InputError, match=r"took longer than 1 s \(MMDET_MLFLOW_FETCH_TOTAL_TIMEOUT\)"):
        fetch_url(f"{slow_server}/drip-headers")


def test_a_request_budget_is_shared_by_its_url_rows(slow_server, allow_loopback, monkeypatch):
    """Three URLs, each well within its own deadline, together over the request's budget: the
    rows are fetched one after another against one budget, and the third is refused."""
    from scoring.decode import decode_image
    from scoring.fetch import request_budget

    monkeypatch.setenv(settings.FETCH_REQUEST_BUDGET.env, "1")
    budget = request_budget()
    decoded = []
    with pytest.raises(InputError) as err:
        for row in range(3):
            decoded.append(decode_image(f"{slow_server}/late", row=row, budget=budget))
    assert len(decoded) == 1 and str(err.value).startswith("row 1: fetching")
    assert "FETCH_REQUEST_BUDGET" in str(err.value)


def test_the_budget_counts_fetching_not_the_model_between_rows(slow_server, allow_loopback, monkeypatch):
    """Rows are fetched between forward passes: a slow model must not spend the URL budget
    (two 0.6 s fetches in a 3 s budget, 3.5 s of other work between them)."""
    from scoring.decode import decode_image
    from scoring.fetch import request_budget

    monkeypatch.setenv(settings.FETCH_REQUEST_BUDGET.env, "3")
    budget = request_budget()
    decode_image(f"{slow_server}/late", row=0, budget=budget)
    time.sleep(3.5)  # the model's forward pass on row 0
    assert decode_image(f"{slow_server}/late", row=1, budget=budget).shape == (32, 48, 3)


def test_a_content_length_only_isdigit_accepts_is_not_a_crash(slow_server, allow_loopback):
    from scoring.decode import decode_image

    assert decode_image(f"{slow_server}/superscript-length", row=0).shape == (32, 48, 3)
