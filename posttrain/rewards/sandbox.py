"""Run untrusted (model-written) Python in a sandboxed subprocess, never in-process.

``run(program)`` writes the program to a fresh directory and starts ``sandbox_launcher.py`` (see
its docstring for the isolation: namespaces without network, every mount read-only but the work
directory and a private /tmp, a PID namespace, rlimits on CPU time, address space, file size and
open files, no new processes, uid 65534 when started as root) with a scrubbed environment
(``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only) and no stdin, in a session of its own that is killed whole at the wall-clock
limit. Output is capped. The program passed when it exited 0 *and* printed the run's random
marker, which the launcher prints only after the program returned normally (an ``os._exit(0)``
before the tests ran is a failure, not a pass).

The isolation needs mount/network/PID namespaces: root, or unprivileged user namespaces. Where
neither is available ``run`` refuses (``SandboxUnavailable``) rather than run code unconfined.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
MAX_OUTPUT = 1 << 20


class SandboxUnavailable(RuntimeError):
    """This machine cannot create the namespaces the sandbox needs."""


@dataclass
class Result:
    passed: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


def _base_dir() -> str:
    # Outside /tmp: the sandbox mounts a private tmpfs over /tmp, which would hide the work directory.
    from posttrain.util import cache_root

    base = cache_root() / "sandbox"
    base.mkdir(parents=True, exist_ok=True)
    return str(base)


def run(program: str, *, timeout: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 1024) -> Result:
    workdir = tempfile.mkdtemp(prefix="run-", dir=_base_dir())
    try:
        os.chmod(workdir, 0o777)
        path = Path(workdir) / "program.py"
        path.write_text(program)
        os.chmod(path, 0o644)
        marker = "posttrain-sandbox-ok-" + secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/mnt/work", "TMPDIR": "/tmp",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", str(LAUNCHER), workdir, str(path), marker, str(cpu_seconds),
                                 str(memory_mb)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=workdir, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            out, err = proc.communicate()
        stdout = out[:MAX_OUTPUT].decode("utf-8", "replace")
        stderr = err[:MAX_OUTPUT].decode("utf-8", "replace")
        if "unshare" in stderr and "Operation not permitted" in stderr and marker not in stdout:
            raise SandboxUnavailable("cannot create the sandbox's namespaces here (needs root or user namespaces)")
        lines = stdout.splitlines()
        passed = not timed_out and proc.returncode == 0 and bool(lines) and lines[-1] == marker
        if passed:
            stdout = "\n".join(lines[:-1]).rstrip("\n")
        return Result(passed, proc.returncode, stdout, stderr, timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
