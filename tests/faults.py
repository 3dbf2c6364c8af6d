"""A fault-injecting HTTP front for tests: ``FaultProxy(upstream_url, faults)`` listens on its own port
and answers each request with the next item of ``faults`` (one per request, then none):

- an HTTP status (``429``, ``500``, ...): that status with an OpenAI-style error body;
- ``"timeout"``: the request is forwarded after ``delay`` seconds;
- ``"drop"``: the connection is closed unanswered;
- ``"garbage"``: a 200 whose body is not JSON;
- ``None``: forwarded at once.

Forwarded requests go to the real server (``posttrain serve``'s) and its answer comes back whole."""

from __future__ import annotations

import http.client
import json
import socketserver
import threading
import time
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(self, upstream: str, faults: list | None = None, delay: float = 3.0):
        parts = urlsplit(upstream)
        self.upstream, self.delay = (parts.hostname, parts.port), delay
        self.faults, self.lock = list(faults or []), threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                while proxy.one_request(self.rfile, self.wfile):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_fault(self):
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def one_request(self, rfile, wfile) -> bool:
        """Read one request and answer it; False when the connection is to be closed."""
        line = rfile.readline()
        if not line.strip():
            return False
        headers = {}
        while (h := rfile.readline()).strip():
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        body = rfile.read(int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0")))
        fault = self.next_fault()
        if fault == "drop":
            return False
        if fault == "garbage":
            status, data, kind = 200, b"<html>upstream hiccup</html>", "application/json"
        elif isinstance(fault, int):
            status, kind = fault, "application/json"
            data = json.dumps({"error": {"message": f"injected fault {fault}", "type": "injected"}}).encode()
        else:
            if fault == "timeout":
                time.sleep(self.delay)
            method, path, _ = line.decode("latin-1").split(" ", 2)
            forward = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection", "content-length")}
            conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            conn.request(method, path, body, headers=forward)
            answer = conn.getresponse()
            status, data, kind = answer.status, answer.read(), answer.getheader("Content-Type", "application/json")
            conn.close()
        reason = http.client.responses.get(status, "Status")
        try:
            wfile.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n\r\n"
                        .encode() + data)
            wfile.flush()
        except OSError:  # the client gave up (its timeout)
            return False
        return True


class Faulty:
    """``posttrain serve``'s server in this process with a ``FaultProxy`` in front: ``.url`` (the
    proxy's), ``.served`` (the server's counts), ``.close()``."""

    def __init__(self, engine, name: str, faults: list | None = None, delay: float = 3.0, **kwargs):
        from posttrain.inference.serve import start_server

        self.server = start_server(engine, name, **kwargs)
        self.proxy = FaultProxy(self.server.url, faults, delay)
        self.url, self.served = self.proxy.url, self.server.served

    def close(self) -> None:
        self.proxy.close()
        self.server.close()
