"""A fault-injecting HTTP proxy on 127.0.0.1 for object-storage tests.

It forwards every request to an upstream (the moto S3 server) and, on a seeded schedule, answers a share of
them with HTTP 500/503, delays them, or drops the connection without answering. Clients (boto3, pyarrow,
Ray Data) see the same kinds of faults a real S3 endpoint produces under load. With all rates at 0 it is a
recording proxy: ``plan.requests`` lists every request it received (the GET count per object).

:class:`RecordingServer` is a plain HTTP origin that records what it is asked (and redirects ``/r``): the image
fetcher's tests use it to show what was, and was not, requested.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


@dataclass
class FaultPlan:
    error_rate: float = 0.2  # share answered with 500/503
    drop_rate: float = 0.05  # share whose connection is closed without a response
    slow_rate: float = 0.05  # share delayed by slow_s before forwarding
    slow_s: float = 0.5
    slowdown_share: float = 0.2  # share of the errors that are 503 SlowDown (the rest 500 InternalError)
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"forwarded": 0, "error": 0, "drop": 0, "slow": 0})
    # errors + drops by the client that met them: "boto3" (botocore's User-Agent) or "other" (pyarrow's AWS SDK)
    faults_by_client: dict[str, int] = field(default_factory=lambda: {"boto3": 0, "other": 0})
    # every request the proxy received, as (method, path): a recording proxy counts GETs per object
    requests: list[tuple[str, str]] = field(default_factory=list)
    # errors + drops met by the project's boto3 clients (storage.s3_client), by the pid in their User-Agent
    faults_by_pid: dict[int, int] = field(default_factory=dict)


class FaultProxy:
    """``with FaultProxy(upstream_url, FaultPlan(...)) as proxy: client(endpoint=proxy.url)``."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        self.upstream = urlparse(upstream)
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                body = self._read_body()
                with proxy._lock:
                    proxy.plan.requests.append((self.command, self.path))
                fate = proxy._fate()
                if fate in ("error", "drop"):
                    agent = self.headers.get("User-Agent") or ""
                    pid = re.search(r"vlm2rec-pid/(\d+)", agent)
                    with proxy._lock:
                        proxy.plan.faults_by_client["boto3" if "Botocore" in agent else "other"] += 1
                        if pid:
                            by_pid = proxy.plan.faults_by_pid
                            by_pid[int(pid[1])] = by_pid.get(int(pid[1]), 0) + 1
                if fate == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fate == "error":
                    # mostly 500 InternalError; some 503 SlowDown (boto3's adaptive mode throttles on those)
                    status, code = (503, b"SlowDown") if proxy._rng.random() < proxy.plan.slowdown_share else (
                        500, b"InternalError")
                    msg = b"<Error><Code>" + code + b"</Code><Message>injected fault</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body: bytes left over would be read
                        self.wfile.write(msg)  # as the next answer on this keep-alive connection
                    return
                if fate == "slow":
                    time.sleep(proxy.plan.slow_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in {"connection", "transfer-encoding", "content-length", "expect"}}
                if chunked:  # re-chunk: moto decodes aws-chunked payloads only from chunked requests
                    conn.request(self.command, self.path, body=iter([body or b""]),
                                 headers={**headers, "Transfer-Encoding": "chunked"}, encode_chunked=True)
                else:
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(k, v)
                # a HEAD answer has no body but carries the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_body(self) -> bytes | None:
                """The request body, de-chunked when sent with ``Transfer-Encoding: chunked`` (pyarrow does)."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()  # CRLF after each chunk
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _fate(self) -> str:
        with self._lock:
            r = self._rng.random()
            p = self.plan
            if r < p.error_rate:
                fate = "error"
            elif r < p.error_rate + p.drop_rate:
                fate = "drop"
            elif r < p.error_rate + p.drop_rate + p.slow_rate:
                fate = "slow"
            else:
                fate = "forwarded"
            p.counts[fate] += 1
            if fate == "slow":
                p.counts["forwarded"] += 1
            return fate

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class RecordingServer:
    """An HTTP server on 127.0.0.1 that records each request's path, answers ``body``, and redirects ``/r`` to
    ``redirect_to``. Use as a context manager (or call :meth:`close`)."""

    def __init__(self, redirect_to: str = "", body: bytes = b"") -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                redirect = self.path == "/r"
                self.send_response(302 if redirect else 200)
                if redirect:
                    self.send_header("Location", redirect_to)
                self.send_header("Content-Length", "0" if redirect else str(len(body)))
                self.end_headers()
                if not redirect:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RecordingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
