"""The inside of the sandbox: isolates itself, then runs untrusted Python sent to it over a pipe.
Started by ``sandbox.Sandbox`` as ``python -I sandbox_launcher.py CPU_SECONDS MEMORY_MB WORK_MB REQUESTS_FD REPLIES_FD``
(moved to fds 3 and 4); uses the standard library only (it also serves the parent as the
module that holds the value codec, ``encode``/``decode``).

1. **Namespaces**: new user (when not root), mount, network, PID, IPC and UTS namespaces. Without root
   the caller's uid is mapped to 65534 and nothing to 0: no uid inside can ever hold root's rights.
2. **A root of its own** (``pivot_root`` onto a tmpfs, the old root detached): only ``/usr``, the
   ``/lib*`` and ``/bin`` directories, the Python installation's directories (at their own paths) and
   ``/dev/{null,zero,random,urandom}``, all read-only; a size- and inode-bounded tmpfs at ``/sandbox``
   (the working directory) and at ``/tmp``. No ``/proc``, ``/sys``, ``/etc``, home directory or host
   disk: nothing the program writes reaches the disk, and nothing is left behind when it dies.
3. **A PID namespace's init** (trusted, dies with the launcher: ``PR_SET_PDEATHSIG``) forks the worker;
   when the parent kills the launcher, init dies and the kernel kills everything in the namespace,
   whatever sessions or process groups the program made.
4. **The worker** sets rlimits (CPU seconds, address space, file size, open files, no core files), drops
   to uid/gid 65534 (as root), empties every capability set and the bounding set, sets
   ``no_new_privs`` and non-dumpable, ``RLIMIT_NPROC`` 0 (no process or thread can be created), and on
   x86-64 a seccomp filter (``SECCOMP_DENIED``: ptrace, mount, namespaces, keyrings, bpf, io_uring,
   kernel modules...; sockets other than AF_UNIX). Then it serves requests:
   ``{"op": "exec", "code": str}`` runs code in one persistent ``__main__`` namespace;
   ``{"op": "call", "name": str, "args": [...]}`` calls a function defined there. Values cross as
   plain data only (``encode``/``decode``): no object of the program's reaches the parent or a checker.
   Code run here may ask the parent for a call (``__posttrain_remote__``): that is how a checker
   sandbox calls a candidate that runs in another sandbox.

Nothing this process prints or sends decides a verdict by itself: the parent reads its replies as data.
"""

import builtins
import ctypes
import fcntl
import json
import os
import resource
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
NOBODY = 65534
WORKDIR = "/sandbox"  # the working directory inside (a tmpfs)
REQUESTS, REPLIES = 3, 4
MAX_MESSAGE = 16 << 20
MAX_DEPTH = 100
MAX_NODES = 1_000_000
TMPFS = "size={mb}m,nr_inodes=4096,mode=1777"

# --- the value codec: plain data only -------------------------------------------------------------


class NotPlainData(ValueError):
    """A message that is not plain data within the limits."""


def encode(value, _depth: int = 0, _count: list | None = None):
    """A JSON-able form of ``value`` built only from None, bool, int, float, str, bytes, complex, list,
    tuple, dict, set and frozenset (exact types: a subclass is refused). Containers are tagged
    (``{"tuple": [...]}``), so a JSON object is never a value itself."""
    count = _count if _count is not None else [0]
    count[0] += 1
    if _depth > MAX_DEPTH or count[0] > MAX_NODES:
        raise NotPlainData("value too deep or too large")
    t = type(value)
    if value is None or t in (bool, int, str):
        return value
    if t is float:
        return {"float": repr(value)}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    if t in (list, tuple, set, frozenset):
        items = sorted(value, key=repr) if t in (set, frozenset) else value
        return {t.__name__: [encode(v, _depth + 1, count) for v in items]}
    if t is dict:
        return {"dict": [[encode(k, _depth + 1, count), encode(v, _depth + 1, count)] for k, v in value.items()]}
    raise NotPlainData(f"a {t.__name__} is not plain data")


def decode(data, _depth: int = 0, _count: list | None = None):
    """The inverse of ``encode``; anything else (an unknown tag, a wrong shape) raises ``ValueError``."""
    count = _count if _count is not None else [0]
    count[0] += 1
    if _depth > MAX_DEPTH or count[0] > MAX_NODES:
        raise NotPlainData("value too deep or too large")
    t = type(data)
    if data is None or t in (bool, int, str):
        return data
    if t is not dict or len(data) != 1:
        raise NotPlainData("not an encoded value")
    (tag, body), = data.items()
    if tag == "float" and type(body) is str:
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is str for x in body):
        return complex(float(body[0]), float(body[1]))
    if type(body) is not list:
        raise NotPlainData("not an encoded value")
    if tag == "dict":
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise NotPlainData("not an encoded dict")
        return {decode(k, _depth + 1, count): decode(v, _depth + 1, count) for k, v in body}
    kinds = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    if tag not in kinds:
        raise NotPlainData(f"unknown tag {tag!r}")
    return kinds[tag](decode(v, _depth + 1, count) for v in body)


def write_message(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def read_message(fd: int) -> dict | None:
    """One length-prefixed JSON message, or None at end of file."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_MESSAGE:
        raise NotPlainData("message too large")
    body = _read_exactly(fd, n)
    return None if body is None else json.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- isolation ------------------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _locked_flags(path: str) -> int:
    """The flags a read-only remount of the mount at ``path`` must keep (in a user namespace, dropping
    nosuid/nodev/noexec/atime flags of a mount made outside it is refused)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def _bind_read_only(source: str, target: str, binds: list) -> None:
    binds.append(target)
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)


def _python_dirs() -> list[str]:
    return sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))})


def _mount_point() -> str:
    """Where the new root is built: an existing directory that holds none of the files bound into it."""
    for path in ("/mnt", "/media", "/srv", "/opt", "/boot", "/home", "/var", "/tmp"):
        if os.path.isdir(path) and not os.path.islink(path) and \
                not any(d == path or d.startswith(path + "/") for d in _python_dirs()):
            return path
    raise OSError("no directory to build the sandbox's root on")


def _isolate(root: str, work_mb: int) -> None:
    """Steps 1 and 2 of the module docstring; afterwards this process's ``/`` is the new root."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0:
        _check(libc.unshare(flags), "unshare")
    else:
        _check(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{NOBODY} {uid} 1"), ("gid_map", f"{NOBODY} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    for path in (WORKDIR, "/tmp"):
        os.mkdir(root + path)
        _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, TMPFS.format(mb=work_mb))
    binds: list[str] = []
    sources = [p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32") if os.path.lexists(p)]
    for path in sources:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
        else:
            _bind_read_only(path, root + path, binds)
    for prefix in _python_dirs():
        if not any(prefix == s or prefix.startswith(s + "/") for s in sources if not os.path.islink(s)):
            _bind_read_only(prefix, root + prefix, binds)
    os.mkdir(root + "/dev")
    for dev in ("null", "zero", "random", "urandom"):
        _bind_read_only(f"/dev/{dev}", f"{root}/dev/{dev}", binds)
    # Every bind under the new root read-only, submounts included (a recursive bind copies them rw).
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4].replace("\\040", " ") for line in f]
    for target in targets:
        if any(target == b or target.startswith(b + "/") for b in binds):
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(target))
    os.mkdir(root + "/.old")
    _check(libc.syscall(155 if os.uname().machine == "x86_64" else 41, root.encode(), (root + "/.old").encode()),
           "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount /.old")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _drop_privileges() -> None:
    """Step 4: no uid 0, no capability in any set, no way to gain one (``no_new_privs``)."""
    PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 24, 38, 47
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last capability
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still uid 0 after dropping privileges")


# x86-64 syscall numbers refused with EPERM (clone with a namespace flag, and socket other than AF_UNIX,
# are checked by their first argument; clone3 gets ENOSYS, so libc falls back to clone).
SECCOMP_DENIED = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
    "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
    "sethostname": 170, "setdomainname": 171, "acct": 163, "quotactl": 179, "open_by_handle_at": 304,
    "name_to_handle_at": 303, "iopl": 172, "ioperm": 173, "syslog": 103, "vhangup": 153, "personality": 135,
    "lookup_dcookie": 212, "uselib": 134,
}
SYS_CLONE, SYS_CLONE3, SYS_SOCKET = 56, 435, 41
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The filter as ``(code, jt, jf, k)`` BPF instructions (x86-64)."""
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, JMP|JGE|K, RET|K
    KILL, ALLOW, ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
    EPERM, ENOSYS, AF_UNIX = 1, 38, 1
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, 0xC000003E), (RET, 0, 0, KILL),  # arch must be x86-64
            (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM)]  # no x32 numbers
    for nr in sorted(SECCOMP_DENIED.values()):
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO | EPERM)]
    prog += [(JEQ, 0, 1, SYS_CLONE3), (RET, 0, 0, ERRNO | ENOSYS)]
    prog += [(JEQ, 0, 4, SYS_CLONE), (LD, 0, 0, 16), (JSET, 0, 1, NAMESPACE_FLAGS), (RET, 0, 0, ERRNO | EPERM),
             (RET, 0, 0, ALLOW)]
    prog += [(JEQ, 0, 4, SYS_SOCKET), (LD, 0, 0, 16), (JEQ, 1, 0, AF_UNIX), (RET, 0, 0, ERRNO | EPERM),
             (RET, 0, 0, ALLOW)]
    return prog + [(RET, 0, 0, ALLOW)]


def _install_seccomp() -> bool:
    if os.uname().machine != "x86_64":
        return False  # the numbers above are x86-64's; elsewhere the namespaces and dropped rights remain

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    insns = seccomp_program()
    array = (Filter * len(insns))(*[Filter(*i) for i in insns])
    prog = Program(len(insns), array)
    _check(libc.prctl(22, 2, ctypes.byref(prog), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return True


def _limit(cpu_seconds: int, memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# --- serving --------------------------------------------------------------------------------------


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:2000]}


def _remote(*args):
    """Ask the parent to call the function it relays to (a checker's candidate); returns its value."""
    write_message(REPLIES, {"op": "remote", "args": encode(list(args))})
    reply = read_message(REQUESTS)
    if reply is None:
        raise SystemExit(1)
    if reply.get("ok"):
        return decode(reply["value"])
    error = reply.get("error") or {}
    kind = getattr(builtins, str(error.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = RuntimeError
    raise kind(str(error.get("message", "")))


def serve() -> None:
    import traceback
    import types

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    main.__posttrain_remote__ = _remote
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    while True:
        request = read_message(REQUESTS)
        if request is None:
            return
        reply = {"ok": True}
        try:
            if request["op"] == "exec":
                exec(compile(request["code"], "program.py", "exec"), main.__dict__)
                reply["value"] = None
            elif request["op"] == "call":
                reply["value"] = encode(getattr(main, request["name"])(*decode(request["args"])))
            else:
                raise NotPlainData(f"unknown op {request['op']!r}")
        except SystemExit as e:
            reply = {"ok": False, "error": {"type": "SystemExit", "message": str(e.code)}}
        except BaseException as e:  # noqa: BLE001 - every failure of the program is a reply
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
            reply = {"ok": False, "error": _error(e)}
        sys.stdout.flush()
        sys.stderr.flush()
        write_message(REPLIES, reply)


def main() -> None:
    cpu_seconds, memory_mb, work_mb, requests, replies = (int(x) for x in sys.argv[1:6])
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (requests, replies)]
    for fd, to in zip(high, (REQUESTS, REPLIES)):
        os.dup2(fd, to)
    os.closerange(5, 1 << 16)
    import pkgutil  # noqa: F401  (imported while every file is in place)
    import traceback
    import types  # noqa: F401  (serve's, imported before the old root is gone)

    try:
        _isolate(_mount_point(), work_mb)
    except OSError as e:
        write_message(REPLIES, {"op": "unavailable", "error": str(e)})
        os._exit(3)
    pid = os.fork()
    if pid == 0:  # init of the PID namespace
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: dies with the launcher
        worker = os.fork()
        if worker == 0:
            try:
                os.chdir(WORKDIR)
                _limit(cpu_seconds, memory_mb)
                _drop_privileges()
                resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
                seccomp = _install_seccomp()
                os.closerange(5, 1 << 16)
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                write_message(REPLIES, {"op": "unavailable", "error": str(e)})
                os._exit(3)
            write_message(REPLIES, {"op": "ready", "uid": os.getuid(), "seccomp": seccomp})
            serve()
            os._exit(0)
        while True:  # reap whatever dies; exit with the worker
            try:
                died, status = os.wait()
            except ChildProcessError:
                os._exit(1)
            if died == worker:
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
