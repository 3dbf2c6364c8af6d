"""``posttrain serve`` against strangers and broken clients, over real sockets: no key, a wrong key, a
page on another site (Origin, DNS rebinding), every malformed request a JSON 4xx naming its field
(sizes, numbers, nesting, Content-Length), clients that are slow to send, that stop reading, that
leave mid-stream, hundreds of idle connections, and an engine that fails. The engines are scripted
(no model): what is tested is the server."""

import json
import socket
import threading
import time

import httpx
import pytest

from posttrain.errors import UserError
from posttrain.inference.api import Limits
from posttrain.inference.engine import Completion
from posttrain.inference.serve import start_server
from posttrain.inference.serve_http import Timeouts

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = {"messages": [{"role": "user", "content": "hi"}]}


class Echo:
    """Answers "ok"; a stream comes as ``pieces`` deltas of ``piece`` characters, ``delay`` s apart."""

    def __init__(self, pieces=3, piece=2, delay=0.0, context=None):
        self.pieces, self.piece, self.delay, self.calls, self.sent = pieces, piece, delay, 0, 0
        if context is not None:
            self.max_model_len = context

    def encode(self, messages):
        return [1] * sum(len(m["content"]) for m in messages)

    def generate(self, prompts, sampling, on_text=None):
        self.calls += 1
        if on_text is not None:
            for _ in range(self.pieces):
                on_text(0, "x" * self.piece)
                self.sent += 1
                time.sleep(self.delay)
        return [Completion(text="x" * (self.pieces * self.piece if on_text else 2), token_ids=[1], finish_reason="stop")
                for _ in range(sampling.n)]

    model = object()  # streams through on_text, as the transformers engine does


@pytest.fixture(scope="module")
def server():
    engine = Echo(context=64)
    running = start_server(engine, "echo", api_key=KEY, allowed_origins=("https://friend.example",),
                           timeouts=Timeouts(request=1.0, write=1.0))
    running.engine = engine
    yield running
    running.close()


def client(server, **headers):
    return httpx.Client(base_url=server.url, timeout=10, headers=headers)


def raw(server, data: bytes, wait: float = 5.0, chunks=None, pause=0.0) -> bytes:
    """Send ``data`` (or ``chunks`` with ``pause`` between them) on a raw connection; all it answers
    until the server closes it (or ``<silent>`` after ``wait`` s of nothing)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        for i, chunk in enumerate(chunks or [data]):
            try:
                sock.sendall(chunk)
            except OSError:
                break
            if pause and i < len(chunks or [data]) - 1:
                time.sleep(pause)
        sock.settimeout(wait)
        out = b""
        while True:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                return out + b"<silent>"
            except ConnectionResetError:
                return out + b"<reset>"
            if not got:
                return out
            out += got
    finally:
        sock.close()


def answer(response: bytes) -> tuple[int, dict]:
    """The first response's status and JSON body."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), response[:300]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return int(head.split()[1]), json.loads(body[:length])


def post(extra: dict | None = None, body: bytes | None = None, headers: str = "") -> bytes:
    data = body if body is not None else json.dumps({**ASK, **(extra or {})}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{headers}\r\n").encode() + data


# --- who may ask ----------------------------------------------------------------------------------

def test_every_route_but_the_page_needs_the_key(server):
    with client(server) as c:
        assert c.get("/").status_code == 200 and b"posttrain chat" in c.get("/").content
        for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/chat/completions"),
                             ("POST", "/posttrain/complete"), ("POST", "/posttrain/weights"), ("GET", "/nothing")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
                r = c.request(method, path, headers=headers, json=ASK if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["param"] == "Authorization" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "echo"
        assert c.post("/v1/chat/completions", headers=AUTH, json=ASK).status_code == 200


def test_strangers_cannot_start_an_open_server():
    with pytest.raises(UserError, match="serving beyond this machine needs an API key"):
        start_server(Echo(), "echo", host="0.0.0.0")
    with pytest.raises(UserError, match="--accept-weights needs an API key"):
        start_server(Echo(), "echo", accept_weights=True)


def test_a_page_on_another_site_is_refused(server):
    evil = {**AUTH, "Origin": "http://evil.example", "Content-Type": "text/plain"}
    with client(server) as c:
        r = c.post("/v1/chat/completions", headers=evil, content=json.dumps(ASK))  # a "simple" cross-site request
        assert r.status_code == 403 and r.json()["error"]["param"] == "Origin"
        assert c.get("/v1/models", headers={**AUTH, "Origin": "null"}).status_code == 403
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        assert c.options("/v1/chat/completions", headers=preflight).status_code == 403
        own = c.post("/v1/chat/completions", headers={**AUTH, "Origin": server.url}, json=ASK)  # the chat page
        assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
        friend = c.post("/v1/chat/completions", headers={**AUTH, "Origin": "https://friend.example"}, json=ASK)
        assert friend.status_code == 200 and friend.headers["access-control-allow-origin"] == "https://friend.example"
        pre = c.options("/v1/chat/completions", headers={"Origin": "https://friend.example",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert c.post("/v1/chat/completions", headers={"Origin": "https://friend.example"}, json=ASK).status_code == 401


def test_without_a_key_only_this_machine_by_name_is_answered():
    open_server = start_server(Echo(), "echo")
    try:
        with client(open_server) as c:
            assert c.post("/v1/chat/completions", json=ASK).status_code == 200
            for host in ("evil.example", "evil.example:80", "10.0.0.7", "127.0.0.1.evil.example"):  # DNS rebinding
                r = c.get("/v1/models", headers={"Host": host})
                assert r.status_code == 403 and r.json()["error"]["param"] == "Host", host
            assert c.get("/v1/models", headers={"Host": f"localhost:{open_server.port}"}).status_code == 200
            r = c.post("/v1/chat/completions", json=ASK, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403
    finally:
        open_server.close()


# --- what a request may ask for -------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 10**12}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 4.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"top_k": -2}, "top_k"), ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": [""]}, "stop"), ({"stop": ["a"] * 17}, "stop"), ({"stream": "yes"}, "stream"),
    ({"logprobs": 1}, "logprobs"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"), ({"num_wait": 65}, "num_wait"),
    ({"max_thinking_tokens": 10**9}, "max_thinking_tokens"), ({"wait": 5, "num_wait": 1}, "wait"),
    ({"messages": [{"role": "user", "content": "y" * 80}]}, "messages"), ({"max_tokens": 63}, "max_tokens"),
])
def test_a_bad_field_is_a_400_naming_it(server, extra, param):
    with client(server, **AUTH) as c:
        r = c.post("/v1/chat/completions", json={**ASK, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and param in r.json()["error"]["message"]


def test_top_k_minus_one_means_none_and_model_must_be_a_string(server):
    with client(server, **AUTH) as c:
        assert c.post("/v1/chat/completions", json={**ASK, "top_k": -1}).status_code == 200
        assert c.post("/v1/chat/completions", json={**ASK, "model": 7}).json()["error"]["param"] == "model"


@pytest.mark.parametrize("body, says", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "'max_tokens'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', "not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32 levels"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", "not JSON"),
    (b"\xff\xfe{", "not JSON"), (b"{'single': 1}", "not JSON"), (b"[1, 2]", "must be a JSON object"),
])
def test_a_body_that_is_not_plain_json_is_a_400(server, body, says):
    status, got = answer(raw(server, post(body=body)))
    assert status == 400 and says in got["error"]["message"]


def test_sizes_and_content_lengths(server):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n" \
           "Content-Type: application/json\r\n"
    status, got = answer(raw(server, (head + f"Content-Length: {10**13}\r\n\r\n").encode(), wait=3))
    assert status == 413 and got["error"]["param"] == "Content-Length"
    for length in ("-1", "abc", "1e3", "99999999999999999999999999"):
        status, got = answer(raw(server, (head + f"Content-Length: {length}\r\n\r\n").encode(), wait=3))
        assert status in (400, 413), length
    big = b'{"x": "' + b"a" * (8 * 2**20) + b'"}'  # chunked, no Content-Length: counted as it arrives
    chunked = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
        f"{len(big[i:i + 2**20]):x}\r\n".encode() + big[i:i + 2**20] + b"\r\n" for i in range(0, len(big), 2**20)) + b"0\r\n\r\n"
    status, got = answer(raw(server, chunked, wait=5))
    assert status == 413 and got["error"]["param"] == "body"
    with client(server, **AUTH) as c:
        r = c.post("/v1/chat/completions", content=json.dumps(ASK), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
        assert c.get("/v1/chat/completions").status_code == 405 and c.get("/v1/chat/completions").json()["error"]
        assert c.get("/nowhere").json()["error"]["type"] == "not_found"


def test_malformed_http_gets_a_json_400(server):
    for request in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX\x00Y: z\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 2**20 + b"\r\n\r\n"):
        status, got = answer(raw(server, request, wait=3))
        assert status == 400 and "malformed HTTP request" in got["error"]["message"]


def test_rollout_routes_need_a_rollout_engine(server):
    with client(server, **AUTH) as c:
        r = c.post("/posttrain/complete", json={"prompts": [[1]], "seeds": [1], "sampling": {}})
        assert r.status_code == 404 and "--engine vllm" in r.json()["error"]["message"]


def test_rollout_requests_are_checked_field_by_field():
    from posttrain.inference.api import BadRequest, rollout_request

    limits = Limits(max_prompts=4, max_tokens=64)
    good = {"prompts": [[1, 2]], "seeds": [3], "sampling": {"max_new_tokens": 8, "top_k": -1}}
    prompts, seeds, sampling = rollout_request(good, limits, 100)
    assert (prompts, seeds, sampling.max_new_tokens, sampling.top_k) == ([[1, 2]], [3], 8, 0)
    for bad, param in (({"prompts": [[1]] * 5, "seeds": [1] * 5}, "prompts"), ({"prompts": [[100]]}, "prompts[0]"),
                       ({"prompts": [[True]]}, "prompts[0]"), ({"seeds": [2**63]}, "seeds[0]"), ({"seeds": []}, "seeds"),
                       ({"sampling": {"n": 2}}, "sampling"), ({"sampling": {"max_new_tokens": 65}}, "sampling.max_new_tokens"),
                       ({"sampling": {"top_p": 2.0}}, "sampling.top_p")):
        with pytest.raises(BadRequest) as e:
            rollout_request({**good, **bad}, limits, 100)
        assert e.value.param == param


# --- slow, stalled and departing clients ----------------------------------------------------------

def test_a_client_slow_to_send_is_cut_off(server):
    start = time.monotonic()
    status, got = answer(raw(server, b"", chunks=[b"G", b"E", b"T", b" "] * 6, pause=0.2, wait=5))  # a byte at a time
    assert status == 408 and time.monotonic() - start < 3.5
    start = time.monotonic()
    assert raw(server, b"", wait=5) == b"" and time.monotonic() - start < 2.5  # connects, says nothing: closed
    body = json.dumps(ASK).encode()
    head = post(body=body)[:-len(body)]
    start = time.monotonic()
    status, got = answer(raw(server, b"", chunks=[head] + [body[i:i + 1] for i in range(len(body))], pause=0.1))
    assert status == 408 and got["error"]["param"] == "body" and time.monotonic() - start < 4


def test_hundreds_of_idle_connections_hold_no_threads_and_block_no_one(server):
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        time.sleep(0.2)
        assert threading.active_count() <= before + 2
        start = time.monotonic()
        with client(server, **AUTH) as c:
            assert c.post("/v1/chat/completions", json=ASK).status_code == 200
        assert time.monotonic() - start < 2
        time.sleep(1.5)  # past the request deadline: the server has closed them
        for s in idle[:20]:
            s.settimeout(2)
            assert s.recv(4096) == b""
    finally:
        for s in idle:
            s.close()


def test_a_client_that_stops_reading_stalls_no_one():
    """A stream of ~16 MB to a client that never reads: the model finishes it (into memory) at once,
    others are answered meanwhile, and the stalled connection is closed after the write timeout."""
    engine = Echo(pieces=256, piece=64 * 1024)
    running = start_server(engine, "echo", timeouts=Timeouts(write=1.0))
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", running.port))
        data = json.dumps({**ASK, "stream": True}).encode()
        stalled.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(0.5)
        start = time.monotonic()
        with httpx.Client(base_url=running.url, timeout=10) as c:
            assert c.post("/v1/chat/completions", json=ASK).status_code == 200
        assert time.monotonic() - start < 2 and engine.calls == 2 and engine.sent == 256
        time.sleep(2.0)
        stalled.settimeout(5)
        received = 0
        while chunk := stalled.recv(1 << 20):  # what was in flight, then the close
            received += len(chunk)
        assert 0 < received < 16 * 2**20
        stalled.close()
    finally:
        running.close()


def test_a_client_that_leaves_a_stream_stops_its_generation():
    engine = Echo(pieces=200, piece=1, delay=0.02)
    running = start_server(engine, "echo")
    try:
        with httpx.Client(base_url=running.url, timeout=10) as c:
            with c.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as r:
                next(r.iter_bytes())
            time.sleep(0.5)
            assert engine.sent < 60  # stopped at its next token, not after 200
            assert c.post("/v1/chat/completions", json=ASK).status_code == 200  # and the model is free again
    finally:
        running.close()


def test_an_engine_that_fails_is_a_500_and_the_server_goes_on():
    class Broken(Echo):
        def generate(self, prompts, sampling, on_text=None):
            raise RuntimeError("kernel exploded")

    running = start_server({"broken": Broken(), "echo": Echo()})
    try:
        with httpx.Client(base_url=running.url, timeout=10) as c:
            r = c.post("/v1/chat/completions", json={**ASK, "model": "broken"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "kernel exploded" not in r.text  # no internals to the client
            stream = c.post("/v1/chat/completions", json={**ASK, "model": "broken", "stream": True})
            assert '"server_error"' in stream.text and "[DONE]" not in stream.text  # the stream ends with the error
            assert c.post("/v1/chat/completions", json={**ASK, "model": "echo"}).status_code == 200
    finally:
        running.close()


def test_the_command_line_refuses_bad_numbers_and_open_binds(capsys):
    from posttrain.cli import main

    for argv in (["--port", "99999"], ["--limit-n", "0"], ["--timeout-write", "nan"], ["--host", "0.0.0.0"]):
        with pytest.raises(SystemExit) as e:
            code = main(["serve", "--model", "m", *argv])
            raise SystemExit(code)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "".join(err) and err[-1].startswith(("posttrain serve: error:", "error:")), err
