"""PID 1 of an ``unshare`` jail (:mod:`engine.jail`): builds the jail's file view and starts
the worker.

``unshare --user --map-root-user --pid --fork --mount --mount-proc --net --ipc --uts`` runs
this file (with ``python -I -S``: standard library only, nothing from the working folder) as
root of a fresh user namespace. It then does what bubblewrap does:

1. mounts an empty in-memory root, binds each shown path into it (read-only ones remounted
   read-only, their sub-mounts too), covers hidden folders with empty in-memory folders, adds a
   minimal ``/dev``, a private ``/tmp`` and ``/dev/shm`` and a ``/proc`` of the jail's own PID
   namespace;
2. ``pivot_root``\\ s into it and detaches the old root, so nothing else of the host is reachable;
3. allows one level of user namespaces inside (each genome's process makes one and forbids any
   further: :mod:`engine.confine`), drops every capability (bounding set, ambient, and
   securebits so that uid 0 gains none on exec) and sets ``no_new_privs``;
4. forks the worker in a session of its own and reaps every orphan until the worker ends, then
   exits with its status: as PID 1 its exit kills whatever is left in the namespace.

A failed step prints ``evoloss jail: STEP: ERROR`` and exits 125.
"""
import ctypes
import marshal
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
#: statvfs flag -> mount flag that must be kept when remounting a bind read-only.
_KEEP = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
         (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

libc = ctypes.CDLL(None, use_errno=True)


class Failed(Exception):
    pass


def _check(result: int, step: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise Failed(f"{step}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None) -> None:
    encode = lambda value: value.encode() if isinstance(value, str) else value  # noqa: E731
    _check(libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {source} on {target}")


def _make_target(target: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()


def _submounts(target: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target or point.startswith(target.rstrip("/") + "/"):
                found.append(point)
    return found


def bind(source: str, target: str, read_only: bool) -> None:
    _make_target(target, source)
    mount(source, target, None, MS_BIND | MS_REC)
    if not read_only:
        return
    for point in _submounts(target):
        flags = os.statvfs(point).f_flag
        keep = 0
        for statvfs_flag, mount_flag in _KEEP:
            if flags & statvfs_flag:
                keep |= mount_flag
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def tmpfs(target: str, size: int, mode: str = "0755") -> None:
    os.makedirs(target, exist_ok=True)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={size}")


def build_root(spec: dict) -> None:
    root = spec["root"]
    size = int(spec["tmpfs_bytes"])
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    tmpfs(root, size)
    inside = lambda path: root + path  # noqa: E731 - every path is absolute
    for link, target in spec["links"]:
        os.makedirs(os.path.dirname(inside(link)), exist_ok=True)
        if not os.path.lexists(inside(link)):
            os.symlink(target, inside(link))
    for kind, path in spec["mounts"]:
        if kind == "tmpfs":
            tmpfs(inside(path), size, "1777" if path == "/tmp" else "0755")
        else:
            bind(path, inside(path), read_only=kind == "ro")
    # The stand-ins for hidden folders and the working folder stay empty: read-only (the working
    # folder is on the worker's import path).
    for kind, path in spec["mounts"]:
        if kind == "tmpfs" and path != "/tmp":
            mount(None, inside(path), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    tmpfs(inside("/dev"), 1 << 20)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            bind(f"/dev/{name}", inside(f"/dev/{name}"), read_only=False)
    for device in spec["devices"]:
        bind(device, inside(device), read_only=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, inside(f"/dev/{name}"))
    tmpfs(inside("/dev/shm"), int(spec.get("shm_bytes", size)), "1777")
    mount(None, inside("/dev"), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)  # /dev/shm stays writable
    os.makedirs(inside("/proc"), exist_ok=True)
    mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if spec["sys"] and os.path.isdir("/sys"):
        bind("/sys", inside("/sys"), read_only=True)
    machine = os.uname().machine
    os.chdir(root)
    if machine in _PIVOT_ROOT:
        _check(libc.syscall(_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
        _check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    else:  # pragma: no cover - architectures without a known pivot_root number
        os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges() -> None:
    # One level of user namespaces below this one: each genome's process makes one to hide what only
    # the trusted phase reads, forbids any further one in it and drops every capability
    # (engine.confine), so a genome can make none. (A few at once: one may outlive its process briefly.)
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as handle:
            handle.write("8")
    except OSError as exc:
        raise Failed(f"disable nested user namespaces: {exc.strerror}") from exc
    PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 28, 38, 47
    for capability in range(64):
        libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # EINVAL past the last capability
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    # NOROOT, NO_SETUID_FIXUP and KEEP_CAPS, each locked: uid 0 gains nothing on exec.
    _check(libc.prctl(PR_SET_SECUREBITS, 0b101111, 0, 0, 0), "securebits")
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main() -> int:
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    try:
        hostname = spec["hostname"].encode()
        _check(libc.sethostname(hostname, len(hostname)), "sethostname")
        build_root(spec)
        drop_privileges()
    except (Failed, OSError) as exc:
        print(f"evoloss jail: {exc}", file=sys.stderr, flush=True)
        return 125
    worker = os.fork()
    if worker == 0:
        try:
            os.setsid()
            os.chdir(spec["workdir"])
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as exc:
            print(f"evoloss jail: start {spec['argv'][0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    while True:  # reap orphans until the worker ends
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:  # pragma: no cover
            continue
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main())
