"""The OS jail every evaluation worker runs in: layer two of the trust boundary (docs/security.md).

A genome is adversarial code. Whatever gets past the static check and the restricted namespaces
lands in a process that sees almost nothing: the jail's file view is an allow-list (the system
library folders, the interpreter, the project's package folders, the plug-in's own module and
declared data, one writable scratch folder that is also ``HOME`` and ``TMPDIR``), with no
network, a PID namespace of its own (no other process visible, every child dies with the
jail), no secret in any environment inside it (the launcher's included: it is PID 1 inside and
its ``/proc/1/environ`` is readable) and resource limits (address space, file size, open
files, no core dumps).

Three sandboxes, strongest first:

* ``bwrap`` (bubblewrap, Debian/Ubuntu package ``bubblewrap``): new user, PID, network, IPC and
  UTS namespaces, capabilities dropped, ``--die-with-parent``; each genome's process then makes
  one user namespace of its own, hides the trusted-only paths, forbids further user namespaces
  and drops every capability (:mod:`engine.confine`).
* ``unshare`` (util-linux): the same namespaces through ``unshare --user --map-root-user --net
  --pid --fork --mount``; :mod:`engine.jail_init` then builds the same file view with a mount
  namespace and ``pivot_root`` and drops every capability before it starts the worker.
* ``none``: no jail, only the scrubbed environment, the scratch folder and the limits. Asked for
  explicitly; it warns. The only choice on macOS and Windows.

``auto`` probes bwrap, then unshare (either may be installed and still blocked, e.g. by a
kernel that forbids unprivileged user namespaces) and takes the first that works.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import marshal
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

#: The values of ``--sandbox``.
MODES = ("auto", "bwrap", "unshare", "none")
#: The project's own packages: a jailed worker imports them, never the folder holding them.
PROJECT_PACKAGES = ("engine", "fitness", "operators", "archives")
#: System folders shown read-only (those that are symlinks, such as ``/lib -> usr/lib``, are
#: recreated as symlinks). ``/etc`` is not: only the dynamic loader's cache is shown.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
#: Device nodes shown when a plug-in asks for GPUs.
GPU_DEVICE_GLOBS = ("nvidia*", "nvidia-caps", "dri", "kfd")
#: Size of the in-memory folders inside the jail (``/tmp``, ``/dev/shm``, hidden folders): the
#: scratch folder, on disk, is where files belong.
TMPFS_BYTES = 1 << 30
#: ``/dev/shm`` when GPUs are shown: NCCL between the ranks of one evaluation needs room there.
GPU_SHM_BYTES = 16 << 30
#: The uid a genome runs as inside the jail when the driver runs as root (never root inside).
JAIL_UID = 1000
#: Resource limits of every worker (besides the address space, set per run).
FILE_SIZE_LIMIT = 64 << 30  # per file: a saved 7B policy is written in shards of a few GB
OPEN_FILES_LIMIT = 4096
#: Hostname inside the jail.
HOSTNAME = "evoloss-jail"


class SandboxUnavailable(ValueError):
    """The sandbox asked for cannot run on this machine (the message says why and what to do)."""


@dataclass(frozen=True)
class Sandbox:
    """The sandbox in effect: ``kind`` is ``bwrap``, ``unshare`` or ``none``; ``reason`` says
    why it was chosen (and, under ``auto``, why stronger ones were not)."""

    kind: str
    reason: str
    requested: str = "auto"

    @property
    def jailed(self) -> bool:
        return self.kind != "none"

    @property
    def warning(self) -> str | None:
        """What the user must hear at run start, or None when the jail is in place."""
        if self.kind != "none":
            return None
        return (f"WARNING: evaluation workers run WITHOUT an OS jail ({self.reason}): a genome that gets past the "
                "static check can read your files, use the network and outlive its evaluation. Install "
                "bubblewrap (apt-get install bubblewrap) and use --sandbox auto.")

    def describe(self) -> str:
        return f"sandbox: {self.kind} ({self.reason})"


@dataclass(frozen=True)
class Limits:
    """Resource limits set on the jail's launcher, inherited by everything inside it."""

    address_space: int = 0  # bytes; 0: none
    file_size: int = FILE_SIZE_LIMIT
    open_files: int = OPEN_FILES_LIMIT

    def prlimit_args(self) -> list[str]:
        args = [f"--fsize={self.file_size}", f"--nofile={self.open_files}", "--core=0"]
        if self.address_space > 0:
            args.insert(0, f"--as={self.address_space}")
        return args

    def apply(self) -> None:
        """Set the limits on this process (where ``prlimit`` is missing: run in a child before exec)."""
        import resource

        if self.address_space > 0:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size, self.file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class View:
    """What a jailed process sees.

    Attributes:
        scratch: The one writable folder (``HOME``, ``TMPDIR``); it must exist.
        read_only: Folders and files shown read-only at their own paths.
        writable: Other folders shown writable (a plug-in's declared caches).
        hide: Folders covered by an empty in-memory folder if a shown folder holds them (the
            user's home, the working folder, the run folder); the working folder stays the
            current directory inside, so relative paths to shown data keep working.
        workdir: The current directory inside (default: the scratch).
        gpus: Show the GPU device nodes.
        host_network: Share the host's network (only when a plug-in declares it and the user
            passed ``--allow-host-network``).
    """

    scratch: Path
    read_only: list[Path] = field(default_factory=list)
    writable: list[Path] = field(default_factory=list)
    hide: list[Path] = field(default_factory=list)
    workdir: Path | None = None
    gpus: bool = False
    host_network: bool = False


# -- choosing a sandbox -----------------------------------------------------------------------------
def choose(mode: str = "auto") -> Sandbox:
    """The sandbox ``--sandbox MODE`` gives on this machine.

    Raises:
        SandboxUnavailable: for an explicit ``bwrap`` or ``unshare`` that cannot run here,
            saying why and how to fix it; for an unknown mode.
    """
    if mode not in MODES:
        raise SandboxUnavailable(f"--sandbox must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return Sandbox("none", "--sandbox none was asked for", requested=mode)
    if not sys.platform.startswith("linux"):
        if mode == "auto":
            return Sandbox("none", f"no OS jail exists for {sys.platform} (bwrap and unshare are Linux only)",
                           requested=mode)
        raise SandboxUnavailable(f"--sandbox {mode} needs Linux; this is {sys.platform}. Use --sandbox none "
                                 "(no OS jail) on this platform")
    if mode in ("auto", "bwrap"):
        problem = probe("bwrap")
        if problem is None:
            why = "bubblewrap works here" if mode == "auto" else "--sandbox bwrap was asked for"
            return Sandbox("bwrap", why, requested=mode)
        if mode == "bwrap":
            raise SandboxUnavailable(f"--sandbox bwrap: {problem}")
        bwrap_problem = problem
    if mode in ("auto", "unshare"):
        problem = probe("unshare")
        if problem is None:
            why = (f"bwrap unavailable ({bwrap_problem}); unshare works here" if mode == "auto"
                   else "--sandbox unshare was asked for")
            return Sandbox("unshare", why, requested=mode)
        if mode == "unshare":
            raise SandboxUnavailable(f"--sandbox unshare: {problem}")
        return Sandbox("none", f"no sandbox works here: bwrap: {bwrap_problem}; unshare: {problem}", requested=mode)
    raise AssertionError(mode)  # pragma: no cover - every mode is handled above


@functools.cache
def probe(kind: str) -> str | None:
    """None if sandbox ``kind`` starts a process here, else what went wrong (cached per process)."""
    executable = shutil.which("bwrap" if kind == "bwrap" else "unshare")
    if executable is None:
        package = "bubblewrap (apt-get install bubblewrap)" if kind == "bwrap" else "util-linux"
        return f"{'bwrap' if kind == 'bwrap' else 'unshare'} is not installed; install {package}"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="evoloss-probe-") as folder:
        # The scratch one level down: the unshare jail's root is made beside it, and goes with it.
        scratch = Path(folder) / "scratch"
        scratch.mkdir()
        view = View(scratch=scratch, read_only=interpreter_paths())
        argv, env = wrap(Sandbox(kind, "probe"), [sys.executable, "-I", "-S", "-c", "pass"], view,
                         {"PATH": "/usr/bin:/bin"}, Limits())
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{kind} did not run: {exc}"
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
        reason = text[-1] if text else f"exit code {done.returncode}"
        hint = ""
        if any(word in reason.lower() for word in ("namespace", "permission", "operation not permitted")):
            hint = (" (unprivileged user namespaces look disabled: sysctl kernel.unprivileged_userns_clone=1, or "
                    "on Ubuntu 24.04+ an AppArmor profile for bwrap, or run in a container that allows them)")
        return f"{kind} is installed but could not start a jail: {reason}{hint}"
    return None


@functools.cache
def _bwrap_supports(option: str) -> bool:
    try:
        text = subprocess.run(["bwrap", "--help"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in text


# -- the file view ----------------------------------------------------------------------------------
def interpreter_paths() -> list[Path]:
    """What the interpreter and its packages need: system libraries, the prefixes, site-packages."""
    paths = [Path(p) for p in SYSTEM_PATHS]
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths.append(Path(prefix))
    paths.append(Path(os.path.realpath(sys.executable)).parent)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        location = sysconfig.get_paths().get(key)
        if location:
            paths.append(Path(location))
    import site

    for location in [*getattr(site, "getsitepackages", lambda: [])(), site.getusersitepackages()]:
        if location in sys.path:
            paths.append(Path(location))
    return [p for p in paths if os.path.lexists(p)]


def package_folder(module_name: str) -> Path | None:
    """The folder of ``module_name``'s top-level package, or the module's own file."""
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    try:
        spec = module.__spec__ if module is not None and module.__spec__ else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        return Path(locations[0]) if locations else None
    return Path(spec.origin) if spec.origin and os.path.exists(spec.origin) else None


def project_paths() -> list[Path]:
    """The project's package folders (editable or installed)."""
    return [p for p in (package_folder(name) for name in PROJECT_PACKAGES) if p is not None]


def plugin_code_paths(plugins: Iterable[Any]) -> list[Path]:
    """The code a worker needs to rebuild each plug-in: the module (file or top-level package)
    of every class in the plug-in's and its interface's hierarchy that is not the project's."""
    paths: list[Path] = []
    for plugin in plugins:
        classes = [*type(plugin).__mro__, *type(getattr(plugin, "interface", None)).__mro__]
        for cls in classes:
            module = getattr(cls, "__module__", "") or ""
            if module in ("builtins", "abc") or module.split(".")[0] in PROJECT_PACKAGES:
                continue
            try:
                file = inspect.getfile(cls)
            except (TypeError, OSError):
                continue
            loaded = sys.modules.get(module)
            # A plug-in loaded from path.py:Class is a module of its own: show only that file.
            if module.startswith("evoloss_plugin_") or loaded is None or not getattr(loaded, "__package__", ""):
                paths.append(Path(file))
            else:
                folder = package_folder(module)
                if folder is not None:
                    paths.append(folder)
    return paths


def plugin_needs(plugins: Iterable[Any]) -> tuple[list[Path], list[Path], bool]:
    """The read-only paths, writable paths and host-network wish the plug-ins declare
    (:meth:`fitness.base.Fitness.sandbox_needs`)."""
    read_only: list[Path] = []
    writable: list[Path] = []
    host_network = False
    for plugin in plugins:
        needs_method = getattr(plugin, "sandbox_needs", None)
        if not callable(needs_method):
            continue
        needs = needs_method()
        read_only.extend(Path(p).expanduser().resolve() for p in needs.read_only if p)
        writable.extend(Path(p).expanduser().resolve() for p in needs.writable if p)
        host_network = host_network or bool(needs.host_network)
    return read_only, writable, host_network


def truth_paths() -> list[Path]:
    """The truth key file in effect (:mod:`fitness.truth`), if any: read-only in the worker's
    jail, for the child that builds problems; every genome's process has it covered."""
    from fitness.truth import key_file

    path = key_file()
    return [path.resolve()] if path is not None else []


def worker_view_parts(plugins: list[Any], *, run_dir: str | os.PathLike | None = None,
                      allow_host_network: bool = False, gpus: bool = False) -> dict[str, Any]:
    """Everything of an evaluation worker's :class:`View` but its scratch folder: the
    interpreter, the project, the plug-ins' code and declared paths; the user's home, the
    working folder and the run folder hidden; the working folder (empty) as the current one."""
    read_only, writable, wants_network = plugin_needs(plugins)
    if wants_network and not allow_host_network:
        import warnings

        names = ", ".join(getattr(p, "name", type(p).__name__) for p in plugins)
        warnings.warn(f"fitness {names} declares that it needs the host's network; its jail has none unless you "
                      "pass --allow-host-network", RuntimeWarning, stacklevel=3)
    hide = [Path.home(), Path.cwd()] + ([Path(run_dir).resolve()] if run_dir else [])
    return {
        "read_only": interpreter_paths() + project_paths() + plugin_code_paths(plugins) + read_only + truth_paths(),
        "writable": writable, "hide": hide, "workdir": Path.cwd(), "gpus": gpus,
        "host_network": wants_network and allow_host_network,
    }


def spec_code_paths(spec: str) -> list[Path]:
    """The code a worker needs to load fitness plug-in ``spec``, as far as the spec shows it
    without importing the plug-in (which imports torch, about a second): a built-in plug-in
    needs only the project; ``module:Class`` (or an entry point's) the module's top-level package;
    ``path.py:Class`` the file and the packages it imports by absolute name. A guess:
    :func:`plugin_code_paths` on the loaded plug-ins is what counts (:func:`same_view`)."""
    from engine.plugins import FITNESS_GROUP, FITNESS_REGISTRY

    spec = spec.strip()
    if spec in FITNESS_REGISTRY:
        spec = FITNESS_REGISTRY[spec]
    elif ":" not in spec:
        import importlib.metadata

        found = [ep.value for ep in importlib.metadata.entry_points(group=FITNESS_GROUP) if ep.name == spec]
        if not found:
            return []  # loading it fails in the driver, with the message
        spec = found[0]
    location = spec.rpartition(":")[0]
    if location.endswith(".py") or "/" in location or "\\" in location:
        file = Path(location)
        return [file, *filter(None, map(package_folder, _imported_packages(file)))] if file.is_file() else []
    top = location.split(".")[0]
    folder = None if top in PROJECT_PACKAGES else package_folder(top)
    return [folder] if folder is not None else []


def _imported_packages(file: Path) -> list[str]:
    """The top-level names a Python file imports absolutely, less the standard library's and the
    project's (the interpreter's and the project's folders are shown anyway)."""
    import ast

    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except (OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    skip = set(sys.stdlib_module_names) | set(PROJECT_PACKAGES)
    return sorted({name for name in names if name not in skip})


def guessed_view_parts(specs: Iterable[str], *, run_dir: str | os.PathLike | None = None,
                       gpus: bool = False) -> dict[str, Any]:
    """:func:`worker_view_parts` for plug-ins that declare nothing beyond their code (no data,
    no writable folder, no host network), worked out from their specs alone
    (:func:`spec_code_paths`): the view workers can boot in while the driver imports the
    plug-ins; only the real view (:func:`same_view`) decides whether they run genomes in it."""
    hide = [Path.home(), Path.cwd()] + ([Path(run_dir).resolve()] if run_dir else [])
    code = [path for spec in specs for path in spec_code_paths(spec)]
    return {"read_only": interpreter_paths() + project_paths() + code + truth_paths(), "writable": [], "hide": hide,
            "workdir": Path.cwd(), "gpus": gpus, "host_network": False}


def same_view(parts: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two :func:`worker_view_parts` give a worker the same jail: the same mounts and
    symlinks (what :func:`plan` builds from them), working folder, devices and network."""
    if not parts or not other:
        return parts == other
    scratch = Path("/nonexistent-evoloss-scratch")  # each worker's own; the same for both here
    plans = [(plan(View(scratch=scratch, **p)), bool(p.get("gpus")), bool(p.get("host_network")))
             for p in (parts, other)]
    return plans[0] == plans[1]


def _resolve_links(path: Path) -> tuple[list[tuple[str, str]], Path]:
    """The symlinks met walking ``path`` from ``/`` (as (link, target) pairs), and where it ends."""
    links: list[tuple[str, str]] = []
    path = Path(os.path.abspath(path))
    for _ in range(40):  # a symlink loop ends the walk
        current = Path("/")
        parts = path.parts[1:]
        for index, part in enumerate(parts):
            candidate = current / part
            if os.path.islink(candidate):
                target = os.readlink(candidate)
                links.append((str(candidate), target))
                path = Path(os.path.normpath(current / target)).joinpath(*parts[index + 1:])
                break
            current = candidate
        else:
            return links, current
    return links, Path(os.path.realpath(path))


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass
class MountPlan:
    """How a :class:`View` is built: symlinks to create, then mounts in order (``ro`` and ``rw``
    binds, ``tmpfs`` for an empty in-memory folder), each folder before what lies in it."""

    links: list[tuple[str, str]]
    mounts: list[tuple[str, Path]]
    workdir: Path


def plan(view: View) -> MountPlan:
    """The symlinks and mounts that build ``view``.

    Raises:
        SandboxUnavailable: when a folder the jail must hide (home, working folder, run folder)
            would itself be shown, or when ``/`` would be.
    """
    links: dict[str, str] = {}
    binds: dict[Path, str] = {}
    for kind, paths in (("ro", view.read_only), ("rw", [*view.writable, view.scratch])):
        for path in paths:
            if not os.path.lexists(path):
                continue
            found, real = _resolve_links(Path(path))
            if not os.path.exists(real):
                continue
            links.update(found)
            if real == Path("/"):
                raise SandboxUnavailable("refusing to show '/' inside the jail: that is every file on this machine")
            if kind == "rw" or binds.get(real) != "rw":
                binds[real] = kind
    shown = list(binds)
    tmpfs = {Path("/tmp")}
    for folder in view.hide:
        real = Path(os.path.realpath(folder))
        if real in binds:
            raise SandboxUnavailable(
                f"{real} would be shown inside the jail, but it is a folder the jail hides (your home, the working "
                "folder or the run folder); keep the interpreter, the project and the plug-in's data elsewhere")
        if real != Path("/") and any(_under(real, folder) for folder in shown):
            tmpfs.add(real)
    workdir = Path(os.path.realpath(view.workdir)) if view.workdir else Path(view.scratch)
    if workdir != Path(view.scratch):
        if workdir == Path("/") or any(_under(workdir, folder) for folder in shown):
            workdir = Path(view.scratch)
        else:
            tmpfs.add(workdir)  # an empty working folder: relative paths to shown data still resolve
    mounts: list[tuple[str, Path]] = [(kind, path) for path, kind in binds.items()]
    mounts += [("tmpfs", path) for path in tmpfs]
    # Leave out a bind inside another of the same kind with no tmpfs between them.
    kept = [(kind, path) for kind, path in mounts if kind == "tmpfs" or not any(
        other != path and _under(path, other) and binds[other] == kind
        and not any(_under(hidden, other) and _under(path, hidden) for hidden in tmpfs)
        for other in binds)]
    order = {"tmpfs": 0, "ro": 1, "rw": 2}
    kept.sort(key=lambda item: (len(item[1].parts), order[item[0]], str(item[1])))
    targets = [path for _, path in kept]
    # A symlink inside a shown folder exists there already.
    link_list = sorted(((link, target) for link, target in links.items()
                        if not any(_under(Path(link), folder) for folder in targets)),
                       key=lambda item: len(Path(item[0]).parts))
    return MountPlan(link_list, kept, workdir)


def _gpu_devices() -> list[str]:
    import glob

    found: list[str] = []
    for pattern in GPU_DEVICE_GLOBS:
        found.extend(sorted(glob.glob(f"/dev/{pattern}")))
    return found


# -- building the command ---------------------------------------------------------------------------
def wrap(sandbox: Sandbox, argv: list[str], view: View, env: dict[str, str], limits: Limits,
         ) -> tuple[list[str], dict[str, str]]:
    """The command that runs ``argv`` with ``env`` in ``sandbox`` showing ``view`` under
    ``limits``, and the (minimal) environment to start that command with."""
    prefix = _prlimit(limits)
    if sandbox.kind == "none":
        return prefix + list(argv), dict(env)
    launcher_env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    mount_plan = plan(view)
    if sandbox.kind == "bwrap":
        return prefix + _bwrap_args(mount_plan, view, env) + ["--", *argv], launcher_env
    if sandbox.kind == "unshare":
        return prefix + _unshare_args(mount_plan, view, env, argv), launcher_env
    raise ValueError(f"unknown sandbox kind {sandbox.kind!r}")


def _prlimit(limits: Limits) -> list[str]:
    executable = shutil.which("prlimit")
    if executable is None:
        return []  # the caller sets them in the child (see :func:`preexec`)
    return [executable, *limits.prlimit_args(), "--"]


def preexec(limits: Limits):
    """A ``preexec_fn`` setting ``limits`` where the ``prlimit`` command is missing, else None."""
    if shutil.which("prlimit") is not None:
        return None
    return limits.apply


def _inside_ids() -> tuple[int, int]:
    """Never root inside: a driver running as root appears as an ordinary user."""
    return (os.getuid() or JAIL_UID), (os.getgid() or JAIL_UID)


def _bwrap_args(mount_plan: MountPlan, view: View, env: dict[str, str]) -> list[str]:
    uid, gid = _inside_ids()
    args = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--hostname", HOSTNAME, "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--uid", str(uid), "--gid", str(gid)]
    if not view.host_network:
        args.append("--unshare-net")
    # No --disable-userns: each genome's process makes one user namespace itself (to hide the
    # trusted-only paths), forbids any further one and drops its capabilities (engine.confine).
    for link, target in mount_plan.links:
        args += ["--symlink", target, link]
    for kind, path in mount_plan.mounts:
        if kind == "tmpfs":
            args += ["--size", str(TMPFS_BYTES), "--tmpfs", str(path)]
        else:
            args += ["--ro-bind" if kind == "ro" else "--bind", str(path), str(path)]
    # The stand-ins for hidden folders and the working folder are empty and stay so: a writable one
    # on the import path (the working folder is) would let a genome plant modules the warm worker imports.
    for kind, path in mount_plan.mounts:
        if kind == "tmpfs" and path != Path("/tmp"):
            args += ["--remount-ro", str(path)]
    shm = GPU_SHM_BYTES if view.gpus else TMPFS_BYTES
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(shm), "--tmpfs", "/dev/shm"]
    if view.gpus:
        for device in _gpu_devices():
            args += ["--dev-bind", device, device]
        if os.path.isdir("/sys"):
            args += ["--ro-bind", "/sys", "/sys"]
    # The root bwrap builds (and the folders it makes on the way to each mount) and /dev are
    # read-only: only /tmp, /dev/shm, the scratch and declared folders can be written.
    args += ["--remount-ro", "/dev", "--remount-ro", "/"]
    args += ["--chdir", str(mount_plan.workdir), "--clearenv"]
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    return args


def _unshare_args(mount_plan: MountPlan, view: View, env: dict[str, str], argv: list[str]) -> list[str]:
    spec = {
        "root": str(view.scratch.parent / f".{view.scratch.name}.root"),
        "links": mount_plan.links,
        "mounts": [[kind, str(path)] for kind, path in mount_plan.mounts],
        "tmpfs_bytes": TMPFS_BYTES,
        "shm_bytes": GPU_SHM_BYTES if view.gpus else TMPFS_BYTES,
        "devices": _gpu_devices() if view.gpus else [],
        "sys": bool(view.gpus),
        "workdir": str(mount_plan.workdir),
        "hostname": HOSTNAME,
        "env": env,
        "argv": list(argv),
    }
    Path(spec["root"]).mkdir(mode=0o700, exist_ok=True)
    init = Path(__file__).with_name("jail_init.py")
    args = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount",
            "--mount-proc", "--ipc", "--uts", "--kill-child"]
    if not view.host_network:
        args.append("--net")
    # marshal (built into the interpreter, which is the same one) costs the init nothing to import.
    return args + ["--", sys.executable, "-I", "-S", str(init), marshal.dumps(spec).hex()]


# -- environment ------------------------------------------------------------------------------------
def jail_environment(env: dict[str, str], view: View, sandbox: Sandbox) -> dict[str, str]:
    """The worker's environment inside the jail: ``env`` (already scrubbed) with the scratch as
    ``HOME`` and ``TMPDIR`` and the sandbox named (``EVOLOSS_SANDBOX``)."""
    inside = dict(env)
    # Caches a plug-in declares (sandbox_needs) stay where the driver finds them, not in the scratch home.
    home = Path.home()
    inside.setdefault("EVOLOSS_CACHE", os.environ.get("EVOLOSS_CACHE") or str(home / ".cache" / "evoloss"))
    inside.setdefault("HF_HOME", os.environ.get("HF_HOME") or str(home / ".cache" / "huggingface"))
    inside.update({"HOME": str(view.scratch), "TMPDIR": str(view.scratch), "EVOLOSS_SANDBOX": sandbox.kind})
    if sandbox.jailed:
        # getpass.getuser() (torch's caches use it) reads these before the password file, which is not shown.
        inside.update({"USER": "evoloss", "LOGNAME": "evoloss"})
    return inside


def in_jail() -> str | None:
    """The sandbox this process runs in (as the executor set it), or None outside any."""
    return os.environ.get("EVOLOSS_SANDBOX")


# -- the driver -------------------------------------------------------------------------------------
def mark_not_dumpable() -> bool:
    """Make this process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): other processes of the
    same user can then neither ptrace it nor read its ``/proc/<pid>/environ`` and memory (root
    still can). True where the platform has it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return False
    PR_SET_DUMPABLE = 4
    return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
