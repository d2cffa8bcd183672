"""A real HTTP server on 127.0.0.1 for download tests: serves bytes, honours `Range: bytes=N-` (206), and
misbehaves on request (cut connections, 503s, corrupted bodies, HTML pages, ignored Range, redirects)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    cut: int = 0  # the next N answers send Content-Length but close after half the body
    fail_5xx: int = 0  # the next N requests get 503
    corrupt: int = 0  # the next N bodies have one byte flipped (-1: every body)
    html: str = ""  # "" | "content-type" (text/html page) | "sniff" (HTML body as octet-stream)
    ignore_range: bool = False  # answer 200 with the whole body even when Range is asked
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Request:
    path: str
    range: str | None


WEB_PAGE = b"<!DOCTYPE html>\n<html><head><title>Box | Login</title></head><body>Sign in</body></html>\n"


class FileServer:
    """`files` maps a name to bytes served at /f/NAME; /r/NAME redirects (302) to /f/NAME."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str, redirect: bool = False) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{'r' if redirect else 'f'}/{name}"

    def requests_for(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/f/{name}"]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with server._lock:
                server.requests.append(Request(self.path, self.headers.get("Range")))
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._answer()
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _answer(self) -> None:
            kind, _, name = self.path.lstrip("/").partition("/")
            if name not in server.files:
                self.send_error(404)
                return
            if kind == "r":
                self.send_response(302)
                self.send_header("Location", server.url(name))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            b = server.behaviour.setdefault(name, Behaviour())
            time.sleep(b.delay)
            with server._lock:
                fail, cut = b.fail_5xx > 0, b.cut > 0
                corrupt = b.corrupt != 0
                b.fail_5xx -= fail
                b.cut -= cut
                b.corrupt -= b.corrupt > 0
            if fail:
                self.send_error(503, "Service Unavailable")
                return
            if b.html == "content-type":  # a page the body sniffing alone would miss: only the header tells
                self._send(
                    200, b'<meta http-equiv="refresh" content="0; url=/login">', "text/html; charset=utf-8"
                )
                return
            if b.html == "sniff":
                self._send(200, WEB_PAGE, None)
                return
            body = server.files[name]
            if corrupt:
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(match.group(1)) if match and not b.ignore_range else None
            if start is not None and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            part = body[start or 0 :]
            extra = (
                {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start is not None else {}
            )
            self._send(206 if start is not None else 200, part, None, extra, cut=cut)

        def _send(self, status, body, ctype, extra=None, cut=False) -> None:  # noqa: ANN001
            self.send_response(status)
            self.send_header("Content-Type", ctype or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            # A cut answer promises the whole body, sends half, then the connection closes (HTTP/1.0).
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.wfile.flush()

    return Handler
