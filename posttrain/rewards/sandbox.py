"""Run untrusted (model-written) Python in a sandboxed process of its own, never in-process.

``Sandbox()`` starts ``sandbox_launcher.py`` (its docstring lists the isolation: namespaces, a root
with only the system's and Python's read-only files and two small tmpfs, no capability, no_new_privs,
seccomp, rlimits, no new processes) with a scrubbed environment and no stdin, and talks to it over
two pipes: ``exec(code)`` runs code in the sandbox's persistent ``__main__`` (state is kept between
calls, as a notebook's), ``call(name, args)`` calls a function defined there and returns its value
decoded as plain data (``sandbox_launcher.decode``: no object of the program reaches this process).
Each request has a wall-clock deadline; at the deadline, or once the program has printed more than
``max_output`` bytes, the sandbox is killed whole (its PID namespace dies with it). Output is read
while it streams, never buffered past the cap.

A verdict never comes from the program being judged: ``posttrain.rewards.code`` runs the candidate in
one sandbox and the tests in another, relaying only values between them (``exec(..., remote=...)``).
``run(program)`` is the one-shot form (``passed``: the program ran to its end without an exception,
which the program itself controls; it is not a verdict).

``SandboxUnavailable`` is raised only when the launcher cannot set the isolation up, which it reports
before any untrusted code has run: no program output can raise it.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.rewards.sandbox_launcher import MAX_MESSAGE, NotPlainData, decode, encode

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
MAX_OUTPUT = 1 << 20
START_SECONDS = 20.0
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/sandbox", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


class SandboxUnavailable(RuntimeError):
    """This machine cannot create the isolation the sandbox needs."""


@dataclass
class Reply:
    """One request's outcome: ``ok`` with ``value``, or ``error`` (``{"type", "message"}``), with what the
    program printed meanwhile."""

    ok: bool
    value: object = None
    error: dict | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False


@dataclass
class Result:
    passed: bool
    stdout: str
    stderr: str
    timed_out: bool
    error: dict | None = field(default=None)


class Sandbox:
    def __init__(self, *, cpu_seconds: int = 10, memory_mb: int = 1024, work_mb: int = 64,
                 max_output: int = MAX_OUTPUT):
        self.max_output = max_output
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(LAUNCHER), str(cpu_seconds), str(memory_mb), str(work_mb), str(req_r),
                 str(rep_w)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                cwd="/", start_new_session=True, pass_fds=(req_r, rep_w))
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._buffer = b""
        self._out = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
        self._seen = {fd: 0 for fd in self._out}
        self._selector = selectors.DefaultSelector()
        for fd in (self._rep_r, *self._out):
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)
        self.alive = True
        self.output_exceeded = False
        first = self._next_message(time.monotonic() + START_SECONDS)
        if not first or first.get("op") != "ready":
            why = (first or {}).get("error") or bytes(self._out[self.proc.stderr.fileno()]).decode("utf-8", "replace")
            self.close()
            raise SandboxUnavailable("cannot set the sandbox up here (it needs root or unprivileged user namespaces): "
                                     + (why.strip().splitlines() or ["the launcher died"])[-1])
        self.seccomp = bool(first.get("seccomp"))

    # -- requests --

    def exec(self, code: str, *, timeout: float = 10.0, remote=None) -> Reply:
        """Run ``code`` in the sandbox's ``__main__``. ``remote(args) -> Reply`` answers the code's calls of
        ``__posttrain_remote__(*args)`` (a checker calling a candidate in another sandbox)."""
        return self._request({"op": "exec", "code": code}, time.monotonic() + timeout, remote)

    def call(self, name: str, args: list, *, timeout: float = 10.0) -> Reply:
        """Call ``name(*args)`` defined in the sandbox; ``value`` is the decoded return value."""
        return self._request({"op": "call", "name": name, "args": encode(list(args))}, time.monotonic() + timeout)

    def _request(self, message: dict, deadline: float, remote=None) -> Reply:
        if not self.alive:
            return Reply(False, error={"type": "SandboxClosed", "message": "the sandbox is not running"})
        mark = dict((fd, len(buf)) for fd, buf in self._out.items())
        try:
            self._send(message, deadline)
            while True:
                reply = self._next_message(deadline)
                if reply is None:
                    return self._reply(mark, False, error=self._death())
                if reply.get("op") == "remote" and remote is not None:
                    answer = remote(decode(reply.get("args")))
                    self._send({"ok": True, "value": encode(answer.value)} if answer.ok
                               else {"ok": False, "error": answer.error}, deadline)
                    continue
                if set(reply) - {"ok", "value", "error"} or type(reply.get("ok")) is not bool:
                    raise NotPlainData("not a reply")
                if reply["ok"]:
                    return self._reply(mark, True, value=decode(reply.get("value")))
                error = reply.get("error")
                error = ({"type": str(error.get("type"))[:200], "message": str(error.get("message"))[:2000]}
                         if isinstance(error, dict) else {"type": "Error", "message": "malformed error"})
                return self._reply(mark, False, error=error)
        except TimeoutError:
            self.close()
            return self._reply(mark, False, error={"type": "Timeout", "message": "the wall-clock limit passed"},
                               timed_out=True)
        except (NotPlainData, ValueError, TypeError, KeyError, AttributeError, RecursionError, OSError) as e:
            self.close()  # a reply that is not plain data: the program wrote on the control pipe itself
            return self._reply(mark, False, error={"type": "ProtocolError", "message": str(e)[:500]})

    def _death(self) -> dict:
        self.close()
        if self.output_exceeded:
            return {"type": "OutputLimit", "message": f"more than {self.max_output} bytes of output"}
        return {"type": "SandboxDied", "message": f"the sandbox exited (status {self.proc.returncode})"}

    def _reply(self, mark: dict, ok: bool, **kw) -> Reply:
        out, err = (bytes(self._out[fd][mark[fd]:]).decode("utf-8", "replace") for fd in self._out)
        return Reply(ok, stdout=out, stderr=err, **kw)

    # -- the pipes --

    def _send(self, message: dict, deadline: float) -> None:
        """Write one message, reading the program's output meanwhile (a program that neither reads its
        requests nor stops printing cannot stall this process past the deadline)."""
        data = json.dumps(message).encode()
        view = memoryview(struct.pack(">I", len(data)) + data)
        os.set_blocking(self._req_w, False)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            readable, writable, _ = select.select(list(self._selector.get_map()), [self._req_w], [], min(left, 1.0))
            for fd in readable:
                if fd != self._rep_r and not self._read_output(fd):
                    raise OSError("the sandbox was killed")
            if writable:
                try:
                    view = view[os.write(self._req_w, view):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    raise OSError("the sandbox closed its requests") from None

    def _next_message(self, deadline: float) -> dict | None:
        """The next control message; None when the sandbox ended; ``TimeoutError`` at the deadline. Reads
        the program's output meanwhile, and kills the sandbox once it passes ``max_output``."""
        while True:
            if len(self._buffer) >= 4:
                (n,) = struct.unpack(">I", self._buffer[:4])
                if n > MAX_MESSAGE:
                    raise NotPlainData("message too large")
                if len(self._buffer) >= 4 + n:
                    body, self._buffer = self._buffer[4:4 + n], self._buffer[4 + n:]
                    self._drain()
                    message = json.loads(body)
                    if not isinstance(message, dict):
                        raise NotPlainData("not a message")
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in self._selector.select(min(left, 1.0)):
                if key.fd == self._rep_r:
                    chunk = _read(key.fd)
                    if chunk == b"":
                        return None
                    self._buffer += chunk or b""
                elif not self._read_output(key.fd):
                    return None

    def _read_output(self, fd: int) -> bool:
        chunk = _read(fd)
        if chunk is None:
            return True
        if chunk == b"":
            self._selector.unregister(fd)
            return True
        buf = self._out[fd]
        buf += chunk[: max(0, self.max_output - len(buf))]
        self._seen[fd] += len(chunk)
        if self._seen[fd] > self.max_output:
            self.output_exceeded = True
            self._kill()
            return False
        return True

    def _drain(self) -> None:
        for fd in list(self._out):
            while self.alive and fd in self._selector.get_map() and _read_pending(fd):
                if not self._read_output(fd):
                    return

    # -- the end --

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._kill()
        self.proc.wait()
        # The worker dies with the launcher's PID namespace a moment later; it holds the replies pipe, so
        # its end of file says it is gone (bounded: the kernel's teardown takes milliseconds).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if _read_pending(self._rep_r, 0.1) and _read(self._rep_r) == b"":
                break
        self._selector.close()
        for fd in (self._req_w, self._rep_r):
            os.close(fd)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "alive", False):
            self.close()


def _read(fd: int) -> bytes | None:
    """Up to 64 KiB; ``b""`` at end of file, None when nothing is there yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _read_pending(fd: int, wait: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], wait)[0])


def run(program: str, *, timeout: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 1024) -> Result:
    """Run ``program`` once in a fresh sandbox; ``passed``: it ran to its end without an exception."""
    with Sandbox(cpu_seconds=cpu_seconds, memory_mb=memory_mb) as box:
        reply = box.exec(program, timeout=timeout)
    return Result(reply.ok, reply.stdout.rstrip("\n"), reply.stderr, reply.timed_out, reply.error)
