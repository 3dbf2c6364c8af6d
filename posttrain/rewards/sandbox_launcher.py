"""Runs one untrusted Python program inside the sandbox. Started by ``sandbox.run`` as
``python -I sandbox_launcher.py WORKDIR PROGRAM MARKER CPU_SECONDS MEMORY_MB``; uses the standard
library only.

1. New mount, network and PID namespaces (as root directly; otherwise inside a new user namespace
   mapping the caller to root): no network interface but a down loopback.
2. Mounts made private; the interpreter's directories bound under /mnt (readable by an
   unprivileged user wherever Python is installed); tmpfs over /tmp, /var/tmp and /dev/shm; WORKDIR
   bound at /mnt/work; every other mount remounted read-only, so the only writable places are
   WORKDIR and the private tmpfs.
3. Fork: the child is PID 1 of the new PID namespace, with a fresh /proc (no other process is
   visible or signalable). The child sets rlimits (CPU seconds, address space, file size, open
   files, no core files), drops to uid/gid 65534 when root, then RLIMIT_NPROC = 0 (no new process
   or thread can be created), and runs PROGRAM as ``__main__`` from WORKDIR.
4. Only if PROGRAM returns normally does the child print MARKER; an exception, ``sys.exit`` or
   ``os._exit`` before the end leaves it out. The launcher exits with the child's status.
"""

import ctypes
import os
import resource
import runpy
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NOBODY = 65534

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _isolate(workdir: str) -> dict[str, str]:
    """Namespaces and mounts (see the module docstring). Returns the new places of the Python
    installation's directories, which the unprivileged program must still be able to import from."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    if os.geteuid() == 0:
        _check(libc.unshare(flags), "unshare")
    else:
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # The interpreter may live where an unprivileged user cannot reach (e.g. under /root) or under
    # /tmp (about to be hidden): bind its directories under a fresh tmpfs at /mnt.
    _mount("tmpfs", "/mnt", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    moved: dict[str, str] = {}
    for i, src in enumerate(sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})):
        dst = f"/mnt/python{i}"
        os.mkdir(dst)
        _mount(src, dst, None, MS_BIND | MS_REC)
        moved[src] = dst
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    os.mkdir("/mnt/work")
    _mount(workdir, "/mnt/work", None, MS_BIND | MS_REC)
    moved[os.path.realpath(workdir)] = "/mnt/work"
    # Every other mount read-only: the program can write only in WORKDIR and the private tmpfs.
    keep = {"/mnt/work", "/tmp", "/var/tmp", "/dev/shm", "/proc", "/mnt"}
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in targets:
        if target in keep or target.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError:
            pass  # a mount this process may not touch; writes there are still bounded by permissions
    return moved


def _limit(cpu_seconds: int, memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child(workdir: str, program: str, marker: str, cpu_seconds: int, memory_mb: int, moved: dict) -> None:
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    workdir, program = _relocate(workdir, moved), _relocate(program, moved)
    os.chdir(workdir)
    _limit(cpu_seconds, memory_mb)
    sys.path[:] = [_relocate(p, moved) for p in sys.path] + [workdir]
    if os.getuid() == 0 and _is_real_root():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")
    sys.stdout.flush()
    os.write(1, f"\n{marker}\n".encode())


def _relocate(path: str, moved: dict) -> str:
    real = os.path.realpath(path)
    for src, dst in moved.items():
        if real == src or real.startswith(src + "/"):
            return dst + real[len(src):]
    return path


def _is_real_root() -> bool:
    with open("/proc/self/uid_map") as f:
        return f.read().split()[:3] == ["0", "0", "4294967295"]


def main() -> None:
    workdir, program, marker, cpu_seconds, memory_mb = sys.argv[1:6]
    import pkgutil  # noqa: F401  (runpy needs it; imported while the interpreter's files are in place)
    import traceback

    moved = _isolate(workdir)
    pid = os.fork()
    if pid == 0:
        try:
            _child(workdir, program, marker, int(cpu_seconds), int(memory_mb), moved)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            code = code or 1  # a clean sys.exit() before the end is not a pass either
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
