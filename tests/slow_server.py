"""A slow or odd image server on 127.0.0.1 for the URL cases (tests/test_url_fetch.py,
tests/test_hostile.py): routes that drip, never end, lie about their length or redirect to the
metadata service. Tests allow-list it (by address or by the name localhost) for these only."""
from __future__ import annotations

import contextlib
import http.server
import threading
import time
from typing import Iterator

from hostile_cases import encoded


class SlowHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    png = encoded("PNG")  # 48x32

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path
        if path == "/drip-headers":  # a byte every 0.25 s: no single read ever times out
            for byte in b"HTTP/1.0 200 OK\r\nX-Padding: " + b"x" * 400:
                self._write(bytes([byte]))
                time.sleep(0.25)
        elif path == "/endless":  # a body that never ends
            self._write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n")
            for _ in range(100_000):
                self._write(b"\0" * 65536)
        elif path == "/late":  # a whole image, after 0.6 s
            time.sleep(0.6)
            self._answer(200, self.png)
        elif path == "/superscript-length":  # str.isdigit() says yes, int() says no
            self._write(b"HTTP/1.0 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n" + self.png)
        elif path == "/redirect-metadata":
            self._answer(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/declared-huge":
            self._write(b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999\r\n\r\n" + self.png)
        elif path == "/text":
            self._answer(200, b"just some text, not a picture")
        else:
            self._answer(404, b"not here")

    def _write(self, data: bytes):
        self.wfile.write(data)
        self.wfile.flush()

    def _answer(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up on the slow routes is the point of them


@contextlib.contextmanager
def slow_server(host: str = "127.0.0.1") -> Iterator[str]:
    """The server's base URL, naming it ``host`` (it listens on 127.0.0.1 whatever the name)."""
    httpd = QuietServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
