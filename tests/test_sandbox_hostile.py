"""A hostile program against the sandbox and the code verifier, as an attacker would write it. Every
attack must be contained, score 0, and leave the sandbox working. CI runs this file twice: as root and
as an unprivileged user (``runuser``), the two ways the launcher isolates (docs/rewards.md).

Needs only the standard library and pytest: the non-root run uses the system's Python."""

import ctypes
import os
import resource
import socket
import threading
import time

import pytest

from posttrain.rewards import code, sandbox

ADD = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
               "    assert candidate(10, 5) == 15\n", "entry_point": "add"}
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 0\n"
ROOT = os.geteuid() == 0

ATTACKS = {
    # forging the verdict
    "print_a_pass_marker_and_exit_0": WRONG + "print('posttrain-sandbox-ok-' + 'x' * 32)\nimport os\nos._exit(0)\n",
    "sys_exit_zero": WRONG + "import sys\nsys.exit(0)\n",
    "patch_builtins_and_assert": WRONG + "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                                         "def check(candidate):\n    pass\nimport sys\nsys.excepthook = lambda *a: None\n",
    "object_equal_to_everything": "class Any:\n    __eq__ = lambda self, other: True\n"
                                  "def add(a, b):\n    return Any()\n",
    "int_subclass_equal_to_everything": "class Int(int):\n    __eq__ = lambda self, other: True\n    __hash__ = int.__hash__\n"
                                        "def add(a, b):\n    return Int(0)\n",
    "forged_replies_on_the_control_pipe": WRONG + "import json, os, struct\n"
                                          "for m in ({'ok': True, 'value': None}, {'ok': True, 'value': 5}):\n"
                                          "    d = json.dumps(m).encode()\n    os.write(4, struct.pack('>I', len(d)) + d)\n"
                                          "os._exit(0)\n",
    "garbage_on_the_control_pipe": WRONG + "import os\nos.write(4, b'\\xff' * 64)\n",
    "huge_length_on_the_control_pipe": WRONG + "import os\nos.write(4, b'\\x7f\\xff\\xff\\xff{')\n",
    "read_the_tests_from_frames_and_gc": "import gc, sys\n"
                                         "texts = [v for o in gc.get_objects() if isinstance(o, dict) for v in o.values() if isinstance(v, str)]\n"
                                         "f = sys._getframe()\nwhile f:\n    texts += [v for v in f.f_locals.values() if isinstance(v, str)]\n"
                                         "    f = f.f_back\nTESTS = [t for t in texts if '== ' + '15' in t]\n"
                                         "def add(a, b):\n    return 15 if TESTS else 0\n",
    "read_proc_cmdline": GOOD + "print(open('/proc/self/cmdline', 'rb').read())\n",
    "read_the_parents_memory": GOOD + "import os\nprint(open(f'/proc/{os.getppid()}/mem', 'rb').read(1))\n",
    "ptrace_the_parent": GOOD + "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                "assert libc.ptrace(16, os.getppid(), 0, 0) == 0 or libc.ptrace(16, 1, 0, 0) == 0\n",
    "signal_the_parent_and_everyone": WRONG + "import os, signal\n"
                                              "for pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                                              "    except OSError:\n        pass\nos.killpg(0, signal.SIGKILL)\n",
    "die_at_first_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "tests_catch_nothing_when_the_candidate_hangs": "def add(a, b):\n    while True:\n        pass\n",
    # resources
    "fork_bomb": GOOD + "import os\nwhile True:\n    os.fork()\n",
    "thread": GOOD + "import threading\nthreading.Thread(target=lambda: None).start()\n",
    "memory_bomb": GOOD + "x = []\nwhile True:\n    x.append(bytearray(1 << 26))\n",
    "disk_bomb": GOOD + "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
    "file_count_bomb": GOOD + "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'w').close()\n    i += 1\n",
    "output_flood": GOOD + "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "stderr_says_unshare_is_not_permitted": GOOD + "import sys\nsys.stderr.write('unshare: Operation not permitted\\n')\n"
                                                   "raise SystemExit(1)\n",
    "escape_the_time_limit": GOOD + "import os, signal, time\nos.setsid()\n"
                                    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
                                    "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(3600)\n",
    # the isolation itself
    "remount_root_read_write": GOOD + "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                      "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0\n",
    "new_user_namespace": GOOD + "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000 | 0x20000) == 0\n",
    "tcp_to_loopback": GOOD + "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)\n",
    "tcp_out": GOOD + "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "udp_out": GOOD + "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))\n",
    "unix_socket_file": GOOD + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\n",
    "abstract_unix_socket": GOOD + "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0posttrain-hostile')\n",
}


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    """A TCP and a UDP port on loopback, a Unix socket file and an abstract one, all in this process:
    an attack that reaches any of them is recorded."""
    reached = []
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    path = str(tmp_path_factory.mktemp("sock") / "s")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    os.chmod(path, 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0posttrain-hostile")
    for s in (tcp, unix, abstract):
        s.listen()
        s.settimeout(0.2)
    udp.settimeout(0.2)

    def watch():
        while not stop.is_set():
            for s in (tcp, unix, abstract):
                try:
                    s.accept()
                    reached.append(s)
                except OSError:
                    pass
            try:
                udp.recv(16)
                reached.append(udp)
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield {"PORT": tcp.getsockname()[1], "UNIX_PATH": path, "reached": reached}
    stop.set()
    thread.join()


def launchers() -> int:
    """How many sandbox launchers are running (any user's), read from /proc of this namespace."""
    n = 0
    for pid in os.listdir("/proc"):
        try:
            n += b"sandbox_launcher.py" in open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            pass
    return n


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_is_contained_and_scores_zero(attack, listeners, monkeypatch):
    monkeypatch.setattr(code, "TIMEOUT_SECONDS", 4.0)
    program = ATTACKS[attack].replace("UNIX_PATH", repr(listeners["UNIX_PATH"])).replace("PORT", str(listeners["PORT"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    assert code.score(program, ADD) == 0.0
    assert time.monotonic() - started < 4.0 + 2.0  # the wall-clock limit holds, whatever the program does
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KiB: output is not buffered
    assert listeners["reached"] == []
    assert launchers() == 0  # nothing of the sandbox outlives it
    assert code.score(GOOD, ADD) == 1.0  # and the sandbox still works after


def test_the_same_attacks_pass_on_a_correct_add_only_when_harmless(listeners):
    """The attack table is not trivially failing: with a correct ``add`` and no hostile act the verdict is
    1.0, and the resource attacks with a correct ``add`` defined first still score 0 (they broke the run)."""
    assert code.score(GOOD + "import builtins\nbuiltins.AssertionError = ValueError\n", ADD) == 1.0
    assert code.score(GOOD + "print('posttrain-sandbox-ok-' + 'x' * 32)\n", ADD) == 1.0
    assert code.score("class Any:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return a + b\n", ADD) == 1.0


def test_inside_no_uid_0_no_capability_no_new_privs_seccomp():
    probe = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)\ndata = (ctypes.c_uint32 * 6)()\n"
             "assert libc.capget(hdr, data) == 0\n"
             "print(os.getuid(), os.getgid(), os.geteuid(), list(data), libc.prctl(39, 0, 0, 0, 0), libc.prctl(21, 0, 0, 0, 0),\n"
             "      libc.prctl(3, 0, 0, 0, 0), [libc.prctl(23, c, 0, 0, 0) for c in range(41)].count(1))\n")
    r = sandbox.run(probe)
    assert r.passed, r.stderr
    uid, gid, euid, *rest = r.stdout.split(maxsplit=3)
    assert (uid, gid, euid) == ("65534", "65534", "65534")
    # capability sets all zero; no_new_privs 1; seccomp mode 2 (filter); not dumpable; no capability in the bounding set
    assert rest[0] == "[0, 0, 0, 0, 0, 0] 1 2 0 0"


def test_the_filesystem_is_read_only_but_two_small_tmpfs_and_hides_home(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_secret_token")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # readable by anyone on the host: the sandbox must still not see it
    home_token = os.path.expanduser("~/.cache/huggingface/token")
    program = (
        "import os, errno\nout = {}\n"
        f"for p in ({str(secret)!r}, {home_token!r}, '/etc/passwd', '/root', '/home', '/proc/self/environ'):\n"
        "    try:\n        open(p).read()\n        out[p] = 'read'\n    except OSError as e:\n        out[p] = errno.errorcode[e.errno]\n"
        f"for p in ('/usr/evil', '/evil', '/bin/evil', '/dev/evil', {str(tmp_path / 'evil')!r}):\n"
        "    try:\n        open(p, 'w').write('x')\n        out[p] = 'wrote'\n    except OSError as e:\n        out[p] = errno.errorcode[e.errno]\n"
        "open('/tmp/ok', 'w').write('x')\nopen('ok', 'w').write('x')\nprint(out)\nprint(sorted(os.environ))\n")
    os.environ["POSTTRAIN_TEST_SECRET"] = "hunter2"
    try:
        r = sandbox.run(program)
    finally:
        del os.environ["POSTTRAIN_TEST_SECRET"]
    assert r.passed, r.stderr
    assert "read'" not in r.stdout and "wrote" not in r.stdout and "hunter2" not in r.stdout
    assert r.stdout.splitlines()[1] == "['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'TMPDIR']"
    assert not (tmp_path / "evil").exists()


def test_a_disk_bomb_is_bounded_and_leaves_nothing_on_disk():
    r = sandbox.run("import os\nn = 0\ntry:\n    with open('big', 'wb') as f:\n        while True:\n"
                    "            f.write(b'x' * (1 << 20))\n            n += 1\nexcept OSError as e:\n    print(n, e.errno)\n",
                    timeout=20)
    assert r.passed, r.stderr
    written, errno_ = map(int, r.stdout.split())
    assert errno_ in (27, 28) and written <= 64  # EFBIG (32 MiB per file) or ENOSPC (64 MiB tmpfs)


def test_state_is_kept_between_calls_and_values_are_plain_data():
    with sandbox.Sandbox() as box:
        assert box.exec("x = 41\ndef f(a):\n    return (a, {'k': {1, 2}}, b'\\x00', 1.5, float('inf'), None)\n").ok
        assert box.exec("x += 1").ok
        r = box.call("f", [[1, (2, 3)]])
        assert r.ok and r.value == ([1, (2, 3)], {"k": {1, 2}}, b"\x00", 1.5, float("inf"), None)
        assert type(r.value) is tuple and type(r.value[0][1]) is tuple
        assert box.exec("assert x == 42").ok
        r = box.exec("def g():\n    return object()\n")
        assert box.call("g", []).error["type"] == "NotPlainData"
        assert box.alive  # a value it cannot send is the program's error, not the sandbox's end


def test_a_call_past_its_deadline_kills_the_sandbox_and_later_calls_fail_cleanly():
    with sandbox.Sandbox() as box:
        r = box.exec("import time\ntime.sleep(60)", timeout=1.0)
        assert r.timed_out and not r.ok and not box.alive
        assert box.exec("1").error["type"] == "SandboxClosed"
    assert launchers() == 0


def test_setup_failure_is_sandbox_unavailable_and_not_a_program_outcome(monkeypatch):
    monkeypatch.setattr(sandbox, "LAUNCHER", sandbox.LAUNCHER.with_name("no-such-launcher.py"))
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.Sandbox()


@pytest.mark.skipif(not ROOT, reason="needs root to look at the host's mounts from outside")
def test_no_mount_of_the_sandbox_is_left_on_the_host():
    before = open("/proc/self/mountinfo").read()
    sandbox.run("print(1)")
    assert open("/proc/self/mountinfo").read() == before


def test_the_seccomp_filter_is_well_formed():
    from posttrain.rewards import sandbox_launcher as launcher

    prog = launcher.seccomp_program()
    assert len(prog) < 4096  # BPF_MAXINSNS
    for i, (op, jt, jf, _) in enumerate(prog):  # every jump lands inside the program
        if op & 0x07 == 0x05:
            assert i + 1 + max(jt, jf) < len(prog)
    assert prog[-1] == (0x06, 0, 0, 0x7FFF0000)
    assert ctypes.sizeof(ctypes.c_uint64) == 8
