"""Each genome's process sees less than the warm worker it was forked from, and holds no
capability.

The warm worker's jail shows what the plug-in's trusted phase reads (the test split, the
MT-Bench questions, a reward model). A plug-in lists those paths in
``SandboxNeeds.hidden_from_genome``; in each genome's process, right after the fork and before
any genome code, :func:`confine` covers them: an empty read-only folder over a folder, an empty
file over a file.

How: the process enters a user and mount namespace of its own (it is single-threaded just after
the fork, as ``unshare(CLONE_NEWUSER)`` requires), mounts the covers, forbids user namespaces
below that one, and drops every capability it has there (bounding set, ambient set, securebits
locked so that uid 0 gains none on exec, ``no_new_privs``). Without a capability over its mount
namespace the genome can neither unmount nor remount a cover, and it can make no user namespace
(so no mount namespace) in which it would have one. Linux only; the jail lets each genome's
process make that one user namespace (bubblewrap allows nesting; ``--sandbox unshare`` allows
exactly one level).

A seccomp filter then refuses the genome's process (and all it starts) every call that signals
or tunes the warm worker, its threads, the jail's init or the worker's process group
(``kill``, ``tkill``, ``tgkill``, ``rt_sigqueueinfo``, ``rt_tgsigqueueinfo``, ``prlimit64``,
scheduling and priority calls, ``pidfd_open``; ``kill(-1)`` and ``pidfd_send_signal`` always;
``setpriority`` and ``ioprio_set`` for a whole user, which inside the jail is every process in it),
and every way of naming another process as the one a file's I/O signals go to (``fcntl``
``F_SETOWN``/``F_SETOWN_EX``, ``ioctl`` ``FIOSETOWN``/``SIOCSPGRP``, which the kernel would let
it aim at the worker with any signal through ``F_SETSIG``): a genome ends or stops nothing but
itself. The filter refuses every system call made through another architecture's entry (the
i386 ``int 0x80`` and x32 calls of an x86_64 process, numbered differently) rather than let it
through unchecked.

Kernel keyrings are the driver's: a forked process keeps its parent's session keyring, and with
it the keys (tokens, credentials) the driver's session holds. The genome's process joins a new,
empty session keyring, and the filter refuses it ``keyctl``, ``add_key`` and ``request_key``.

Memory the address-space limit does not count: a ``memfd_create`` file or a System V segment
(``shmget``) holds memory that was never mapped, or no longer is, so a genome could hold many
times its limit in them. Both are refused (and ``memfd_secret``), unless the jail shows GPUs:
their libraries may share memory that way, and ``/dev/shm`` is large there anyway.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Iterable

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_ST_RELATIME = 4096


class ConfineError(OSError):
    """A cover could not be put in place (the reason names the step)."""


def confine(paths: Iterable[str], read_only: Iterable[str] = ()) -> list[str]:
    """Cover every existing path of ``paths`` and make every folder of ``read_only`` read-only
    in this process, for good, and leave it unable to create user namespaces or regain a
    capability (see the module docstring). Returns the paths covered or made read-only.

    Raises:
        ConfineError: naming the step that failed (the caller must not run genome code in this
            process then, unless nothing was to be hidden and no namespace could be made at all).
    """
    targets = sorted({os.path.realpath(path) for path in paths if path and os.path.lexists(path)})
    frozen = sorted({os.path.realpath(path) for path in read_only if path and os.path.isdir(path)} - set(targets))
    if not sys.platform.startswith("linux"):
        raise ConfineError("confining a genome's process needs Linux namespaces")
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    protected, groups = warm_worker_ids()
    # Made in a less privileged user namespace, the new mount namespace's mounts are slaves of the
    # warm worker's: nothing mounted here propagates back. An IPC namespace of its own: System V
    # shared memory, semaphores and message queues die with the process.
    _enter_user_namespace(libc, uid, gid, _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWIPC)
    for folder in _ways_to_mounts():
        # A folder in a writable place that leads to a mount point (the worker's scratch, a
        # plug-in's folder under /tmp) becomes a mount point itself here: it cannot be renamed
        # or removed, so no genome moves a mount from under the worker.
        _call(libc.mount(folder.encode(), folder.encode(), None, _MS_BIND | _MS_REC, None), f"pinning {folder}")
    for folder in frozen:
        _call(libc.mount(folder.encode(), folder.encode(), None, _MS_BIND | _MS_REC, None), f"binding {folder}")
        _call(libc.mount(None, folder.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _kept_flags(folder), None),
              f"making {folder} read-only")
    for target in targets:
        if os.path.isdir(target):
            _call(libc.mount(b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY,
                             b"size=4k,mode=0555"), f"covering {target}")
        else:
            _call(libc.mount(b"/dev/null", target.encode(), None, _MS_BIND, None), f"covering {target}")
            flags = _kept_flags(target)
            _call(libc.mount(None, target.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | flags, None),
                  f"making the cover of {target} read-only")
    try:  # no user namespace below this one
        with open("/proc/sys/user/max_user_namespaces", "w") as stream:
            stream.write("0")
    except OSError as exc:
        raise ConfineError(f"forbidding nested user namespaces: {exc}") from exc
    _drop_capabilities(libc)
    protect_from_genome(protected, groups)
    return targets + frozen


#: Writable places of the jail, where a genome could rename a folder leading to a mount point.
WRITABLE_PLACES = ("/tmp", "/dev/shm")


def mount_points() -> list[str]:
    """This process's mount points (``/proc/self/mountinfo``, octal escapes decoded); none if
    it cannot be read."""
    points = []
    try:
        with open("/proc/self/mountinfo") as stream:
            for line in stream:
                field = line.split(" ")[4]
                points.append(re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field))
    except OSError:
        pass
    return points


def _ways_to_mounts() -> list[str]:
    """Folders inside :data:`WRITABLE_PLACES` on the way to a mount point (not mount points
    themselves), outermost first."""
    points = set(mount_points())
    ways = set()
    for point in points:
        for place in WRITABLE_PLACES:
            if point.startswith(place + "/"):
                parts = point[len(place) + 1:].split("/")
                for depth in range(1, len(parts)):
                    folder = place + "/" + "/".join(parts[:depth])
                    if folder not in points and os.path.isdir(folder):
                        ways.add(folder)
    return sorted(ways, key=lambda folder: (folder.count("/"), folder))


def warm_worker_ids() -> tuple[set[int], set[int]]:
    """What a genome may not signal: the warm worker (this process's parent), its threads and the
    jail's init (pid 1 of the jail's PID namespace); and the worker's process group."""
    parent = os.getppid()
    protected = {1, parent}
    try:
        protected.update(int(tid) for tid in os.listdir(f"/proc/{parent}/task"))
    except (OSError, ValueError):
        pass
    try:
        groups = {os.getpgid(parent)}
    except OSError:
        groups = set()
    return protected, groups


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc) -> None:
    """No capability left, none to regain: bounding and ambient sets emptied, securebits NOROOT,
    NO_SETUID_FIXUP and KEEP_CAPS locked (as under ``--sandbox unshare``'s init, where they are
    locked already), effective and permitted sets cleared, ``no_new_privs``."""
    pr_capbset_drop, pr_set_securebits, pr_set_no_new_privs, pr_cap_ambient = 24, 28, 38, 47
    for capability in range(64):
        libc.prctl(pr_capbset_drop, capability, 0, 0, 0)  # EINVAL past the last capability
    libc.prctl(pr_cap_ambient, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    _call(libc.prctl(pr_set_securebits, 0b101111, 0, 0, 0), "locking the securebits")
    data = (_CapData * 2)()
    _call(libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data), "dropping the capabilities")
    _call(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "setting no_new_privs")


class NoNamespaces(ConfineError):
    """Not even the first user namespace could be made: nothing to confine the process with,
    and nothing the genome could make either."""


def _enter_user_namespace(libc, uid: int, gid: int, flags: int) -> None:
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise NoNamespaces(error, f"entering a user namespace: {os.strerror(error)}")
    # The same ids inside, where the kernel lets this process map itself. It does not when they are
    # root's in the outer namespace (mapping root takes CAP_SETFCAP there, as under --sandbox
    # unshare): the process then runs as the overflow id inside, and the kernel still checks files
    # against its real ids.
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as stream:
                stream.write(text)
    except OSError:
        pass


def _kept_flags(path: str) -> int:
    """The mount flags of ``path`` that a less privileged remount must keep (the kernel locks them)."""
    flags = os.statvfs(path).f_flag
    kept = flags & (_MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_NOATIME | _MS_NODIRATIME)
    return kept | (_MS_RELATIME if flags & _ST_RELATIME else 0)


def _call(result: int, step: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise ConfineError(error, f"{step}: {os.strerror(error)}")


# -- signals and other calls aimed at the warm worker ---------------------------------------------------
#: System call numbers per architecture (``AUDIT_ARCH_*``): those that take a process id as their
#: first argument, those that take it as their second, and those refused outright.
_SYSCALLS = {
    0xC000003E: {  # x86_64
        "pid_first": {"kill": 62, "tkill": 200, "tgkill": 234, "prlimit64": 302, "sched_setaffinity": 203,
                      "sched_setparam": 142, "sched_setscheduler": 144, "sched_setattr": 314, "pidfd_open": 434,
                      "migrate_pages": 256, "move_pages": 279, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297},
        "pid_second": {"setpriority": 141, "ioprio_set": 251},
        "refused": {"pidfd_send_signal": 424, "process_madvise": 440},
        "shared_memory": {"memfd_create": 319, "memfd_secret": 447, "shmget": 29},
        "fcntl": 72, "ioctl": 16,
        "keyrings": {"add_key": 248, "request_key": 249, "keyctl": 250},
        "x32": True,
    },
    0xC00000B7: {  # aarch64
        "pid_first": {"kill": 129, "tkill": 130, "tgkill": 131, "prlimit64": 261, "sched_setaffinity": 122,
                      "sched_setparam": 118, "sched_setscheduler": 119, "sched_setattr": 274, "pidfd_open": 434,
                      "migrate_pages": 238, "move_pages": 239, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240},
        "pid_second": {"setpriority": 140, "ioprio_set": 30},
        "refused": {"pidfd_send_signal": 424, "process_madvise": 440},
        "shared_memory": {"memfd_create": 279, "memfd_secret": 447, "shmget": 194},
        "fcntl": 25, "ioctl": 29,
        "keyrings": {"add_key": 217, "request_key": 218, "keyctl": 219},
        "x32": False,
    },
}
#: Commands (second argument) that name the process a file's I/O signals (``SIGIO``, or any
#: signal chosen with ``F_SETSIG``) go to: ``fcntl`` F_SETOWN and F_SETOWN_EX, ``ioctl`` FIOSETOWN
#: and SIOCSPGRP. The kernel compares only their low 32 bits, as the filter does.
_SET_OWNER = {"fcntl": (8, 15), "ioctl": (0x8901, 0x8902)}
#: The first argument of ``setpriority`` (``PRIO_USER``) and ``ioprio_set`` (``IOPRIO_WHO_USER``)
#: that names every process of a user: refused (inside the jail that is every process in it).
_WHOLE_USER = {"setpriority": 2, "ioprio_set": 3}
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(arch: int, protected: Iterable[int], groups: Iterable[int] = (),
                    shared_memory: bool = False) -> list[tuple[int, int, int, int]]:
    """A seccomp filter (classic BPF, as ``(code, jt, jf, k)``) for architecture ``arch`` that
    refuses (EPERM) signalling or tuning the ``protected`` processes (the warm worker, its
    threads, the jail's init), signalling every process (``kill(-1)``) or the ``groups``,
    tuning the ``groups`` or a whole user's processes (:data:`_WHOLE_USER`),
    ``pidfd_send_signal``, naming any process as the owner of a file's I/O signals
    (:data:`_SET_OWNER`), the kernel keyrings, memory outside the address space (``memfd_create``,
    ``shmget``; allowed with ``shared_memory``), and every call through another architecture's
    entry; everything else is allowed."""
    table = _SYSCALLS[arch]
    groups = list(groups)
    targets = sorted({pid & 0xFFFFFFFF for pid in protected} | {(-pid) & 0xFFFFFFFF for pid in groups})
    # setpriority(PRIO_PGRP, pgid) and ioprio_set(IOPRIO_WHO_PGRP, pgid) name a group by its positive id.
    second_targets = sorted(set(targets) | {pid & 0xFFFFFFFF for pid in groups})
    kill_only = [0xFFFFFFFF] + [(-pid) & 0xFFFFFFFF for pid in protected]  # kill(-1), kill(-pgid)
    code: list[tuple] = [("ld", 4), ("jeq", arch, None, "deny")]  # i386 int 0x80 has other numbers
    code.append(("ld", 0))
    if table["x32"]:
        code.append(("jge", 0x40000000, "deny", None))
    refused = [*table["refused"].values(), *table["keyrings"].values()]
    if not shared_memory:
        refused += table["shared_memory"].values()
    for number in refused:
        code.append(("jeq", number, "deny", None))
    code.append(("jeq", table["pid_first"]["kill"], "kill", None))
    for name, number in table["pid_first"].items():
        if name != "kill":
            code.append(("jeq", number, "first", None))
    for name, number in table["pid_second"].items():
        code.append(("jeq", number, name, None))
    for call in _SET_OWNER:
        code.append(("jeq", table[call], call, None))
    code.append(("ret", _RET_ALLOW))
    for call, commands in _SET_OWNER.items():
        code.append(("label", call))
        code.append(("ld", 24))
        code.extend(("jeq", command, "deny", None) for command in commands)
        code.append(("ret", _RET_ALLOW))
    code.append(("label", "kill"))
    code.append(("ld", 16))
    code.extend(("jeq", value, "deny", None) for value in sorted(set(kill_only)))
    # kill's other forbidden targets are those of the calls below: fall through to them.
    code.append(("label", "first"))
    code.append(("ld", 16))
    code.extend(("jeq", value, "deny", None) for value in targets)
    code.append(("ret", _RET_ALLOW))
    for name in table["pid_second"]:
        code.append(("label", name))
        code.append(("ld", 16))
        code.append(("jeq", _WHOLE_USER[name], "deny", "second"))
    code.append(("label", "second"))
    code.append(("ld", 24))
    code.extend(("jeq", value, "deny", None) for value in second_targets)
    code.append(("ret", _RET_ALLOW))
    code.append(("label", "deny"))
    code.append(("ret", _RET_EPERM))
    code.append(("label", "allow"))
    code.append(("ret", _RET_ALLOW))
    return _assemble(code)


def _assemble(code: list[tuple]) -> list[tuple[int, int, int, int]]:
    labels, position = {}, 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = position
        else:
            position += 1
    program, position = [], 0
    for item in code:
        if item[0] == "label":
            continue
        if item[0] == "ld":
            program.append((_LD_ABS, 0, 0, item[1]))
        elif item[0] == "ret":
            program.append((_RET, 0, 0, item[1]))
        else:
            kind, value, if_true, if_false = item
            jt, jf = (0 if label is None else labels[label] - position - 1 for label in (if_true, if_false))
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("seccomp program too long")
            program.append((_JEQ if kind == "jeq" else _JGE, jt, jf, value & 0xFFFFFFFF))
        position += 1
    return program


def _gpus_shown() -> bool:
    import glob

    from engine.jail import GPU_DEVICE_GLOBS

    return any(glob.glob(f"/dev/{pattern}") for pattern in GPU_DEVICE_GLOBS)


def protect_from_genome(protected: Iterable[int], groups: Iterable[int] = ()) -> bool:
    """Install :func:`seccomp_program` in this process (after ``no_new_privs``); it holds for
    everything it starts (shared memory allowed where the jail shows GPUs). Returns False on an
    architecture it does not know (nothing installed).

    Raises:
        ConfineError: when the kernel refuses the filter.
    """
    import platform

    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return False
    program = seccomp_program(arch, protected, groups, shared_memory=_gpus_shown())
    filters = (_SockFilter * len(program))(*[_SockFilter(*instruction) for instruction in program])
    prog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    # A new, empty session keyring: the driver's (inherited through every fork) is no longer ours.
    # Fails only on a kernel without keyrings, where there is nothing to leave.
    keyctl_join_session_keyring = 1
    libc.syscall(_SYSCALLS[arch]["keyrings"]["keyctl"], keyctl_join_session_keyring, None)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    _call(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "setting no_new_privs")
    _call(libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0), "installing the seccomp filter")
    return True
