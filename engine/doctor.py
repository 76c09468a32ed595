"""``python -m engine doctor``: which OS jail evaluation workers get on this machine, and whether
it holds.

It says which sandbox ``--sandbox auto`` picks and why (each candidate probed), then runs the
project's hostile probes through the chosen one, each as plain Python in a jail built exactly
like an evaluation worker's (the same view, environment and limits), i.e. as a genome that got
past the static check and the restricted namespaces would run. The doctor plants what they look
for: a secret file in the home folder, one in the working folder, a run store, an API-key
variable in its own environment, a loopback TCP listener and an abstract Unix socket, and a
stand-in process for the driver. A last probe runs a genome that rewrites what its process sends
(so that its fitness reads 42) through a real worker with the static check off; another tries to
read a file only the trusted phase reads, and another to rebuild the problem it is trained on from
its seed (a truth key is made for that probe: :mod:`fitness.truth`). Each probe is
judged from outside (did the secret come back, did a file appear, did a connection arrive, does a
process survive, is the stand-in alive), and printed as held or NOT HELD; the exit code is 1 if
any is not held (2 if the sandbox asked for cannot run here).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import jail
from fitness.base import SandboxNeeds
from fitness.synthetic_pref import SyntheticPreference

#: Seconds a probe may run.
PROBE_TIMEOUT = 20.0
#: How long a detached child of the detach probe waits before it writes its marker.
SURVIVOR_DELAY = 1.0

_PRELUDE = """
import json, os, sys
ARGS = json.loads(sys.argv[1])
OUT = []
def say(text):
    OUT.append(str(text)[:4000])
def done():
    print(json.dumps(OUT))
"""

PROBES: dict[str, tuple[str, str]] = {
    "read_home": ("read a file in the home folder", """
for path in (ARGS["home_file"], ARGS["home"]):
    try:
        say(open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as exc:
        say(f"{path}: {exc.strerror}")
done()
"""),
    "read_workdir": ("read files in the working folder and the run store", """
for path in (ARGS["work_file"], ARGS["run_file"], ARGS["workdir"]):
    try:
        say(open(path, errors="replace").read() if os.path.isfile(path) else os.listdir(path))
    except OSError as exc:
        say(f"{path}: {exc.strerror}")
done()
"""),
    "read_environ": ("read /proc/*/environ for API keys", """
paths = ["/proc/self/environ"] + [f"/proc/{p}/environ" for p in os.listdir("/proc") if p.isdigit()]
for path in paths:
    try:
        say(open(path, "rb").read().decode(errors="replace"))
    except OSError as exc:
        say(f"{path}: {exc.strerror}")
say(dict(os.environ))
done()
"""),
    "write_outside": ("write outside the scratch folder", """
for path in ARGS["write_targets"]:
    try:
        with open(path, "w") as handle:
            handle.write("written by a jailed probe")
        say(f"wrote {path}")
    except OSError as exc:
        say(f"{path}: {exc.strerror}")
done()
"""),
    "connect": ("connect to a loopback listener and an abstract socket", """
import socket
try:
    socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=3).close()
    say("connected over TCP")
except OSError as exc:
    say(f"tcp: {exc.strerror or exc}")
try:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.settimeout(3)
    unix.connect("\\0" + ARGS["abstract"])
    unix.close()
    say("connected to the abstract socket")
except OSError as exc:
    say(f"unix: {exc.strerror or exc}")
done()
"""),
    "detach": ("leave a detached child that outlives the evaluation", """
import time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(ARGS["delay"])
        with open(os.path.join(ARGS["scratch"], "survivor"), "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.wait()
say("detached a grandchild")
done()
"""),
    "kill_parent": ("kill its parent and the driver", """
import signal
for name, pid in (("parent", os.getppid()), ("driver", ARGS["driver_pid"])):
    try:
        os.kill(pid, signal.SIGKILL)
        say(f"killed the {name} ({pid})")
    except OSError as exc:
        say(f"{name} ({pid}): {exc.strerror}")
done()
"""),
}


HONEST = ("def dpo(a, b, c, d):\n    import torch.nn.functional as F2\n"
          "    return -F2.logsigmoid(0.1 * ((a - c) - (b - d)))\n")
#: DPO that, from inside its own process, rewrites every message and JSON document it sends so
#: that any "fitness" reads 42 (plain Python: it runs with the static check off).
FORGER = """def dpo(a, b, c, d):
    import json, pickle
    import multiprocessing.connection as connection
    import torch.nn.functional as F2
    if not getattr(connection.Connection, "forged", False):
        def forge(value):
            if isinstance(value, dict):
                for key in value:
                    value[key] = 42.0 if key == "fitness" else forge(value[key])
            elif isinstance(value, list):
                return [forge(item) for item in value]
            return value
        send, dumps, pickle_dumps = connection.Connection.send, json.dumps, pickle.dumps
        connection.Connection.send = lambda self, obj: send(self, forge(obj))
        json.dumps = lambda obj, *args, **kwargs: dumps(forge(obj), *args, **kwargs)
        pickle.dumps = lambda obj, *args, **kwargs: pickle_dumps(forge(obj), *args, **kwargs)
        connection.Connection.forged = True
    return -F2.logsigmoid(0.1 * ((a - c) - (b - d)))
"""


@dataclass
class ProbeResult:
    name: str
    title: str
    held: bool
    detail: str


class Bait:
    """What the probes look for, planted before and removed after."""

    def __init__(self) -> None:
        self.secret = f"evoloss-doctor-secret-{secrets.token_hex(8)}"
        self.tag = secrets.token_hex(6)
        self.folder = Path(tempfile.mkdtemp(prefix="evoloss-doctor-"))
        self.home = Path.home()
        self.workdir = Path.cwd()
        self.home_file = self.home / f".evoloss-doctor-{self.tag}"
        self.work_file = self.workdir / f".evoloss-doctor-{self.tag}"
        self.run_dir = self.workdir / f".evoloss-doctor-run-{self.tag}"
        self.run_file = self.run_dir / "run.sqlite"
        self.planted: list[Path] = []
        self.env_name = "EVOLOSS_DOCTOR_API_KEY"
        self.listener: socket.socket | None = None
        self.abstract: socket.socket | None = None
        self.connections = 0
        self.stand_in: subprocess.Popen | None = None

    def plant(self) -> None:
        for path in (self.home_file, self.work_file):
            try:
                path.write_text(self.secret)
                self.planted.append(path)
            except OSError:
                pass
        try:
            self.run_dir.mkdir()
            self.run_file.write_text(self.secret)
            self.planted += [self.run_file, self.run_dir]
        except OSError:
            pass
        os.environ[self.env_name] = self.secret
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + f"evoloss-doctor-{self.tag}")
        self.abstract.listen()
        for server in (self.listener, self.abstract):
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        self.stand_in = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(600)"],
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def write_targets(self) -> list[str]:
        import engine

        return [str(self.home / f".evoloss-doctor-write-{self.tag}"),
                str(self.workdir / f".evoloss-doctor-write-{self.tag}"),
                str(self.run_dir / f"write-{self.tag}"),
                str(Path(engine.__file__).parent / f".evoloss-doctor-write-{self.tag}"),
                str(Path(sys.prefix) / f".evoloss-doctor-write-{self.tag}"),
                f"/tmp/.evoloss-doctor-write-{self.tag}",
                str(self.folder / f"write-{self.tag}")]

    def remove(self) -> None:
        os.environ.pop(self.env_name, None)
        for server in (self.listener, self.abstract):
            if server is not None:
                server.close()
        if self.stand_in is not None:
            self.stand_in.kill()
            self.stand_in.wait()
        for path in [*map(Path, self.write_targets()), *self.planted]:
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _survivors(tag: str) -> list[int]:
    """Processes (of any namespace) whose command line carries ``tag``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if tag.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found


def run_probe(name: str, sandbox: jail.Sandbox, bait: Bait, view_parts: dict[str, Any]) -> ProbeResult:
    """Run probe ``name`` in a jail like an evaluation worker's; judge it from outside."""
    from engine.executor import scrubbed_environment

    title, body = PROBES[name]
    scratch = Path(tempfile.mkdtemp(prefix=f"probe-{name}-", dir=bait.folder))
    args = {"home": str(bait.home), "home_file": str(bait.home_file), "workdir": str(bait.workdir),
            "work_file": str(bait.work_file), "run_file": str(bait.run_file), "scratch": str(scratch),
            "write_targets": bait.write_targets(), "port": bait.listener.getsockname()[1],
            "abstract": f"evoloss-doctor-{bait.tag}", "delay": SURVIVOR_DELAY,
            "driver_pid": bait.stand_in.pid, "tag": bait.tag}
    code = f"# evoloss-doctor-probe {bait.tag}\n" + _PRELUDE + body
    command = [sys.executable, "-I", "-S", "-c", code, json.dumps(args)]
    if name == "kill_parent":  # a parent of its own inside the jail, so the doctor is never the target
        command = [sys.executable, "-I", "-S", "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
                   *command]
    view = jail.View(scratch=scratch, **view_parts)
    env = jail.jail_environment(scrubbed_environment(), view, sandbox)
    argv, launcher_env = jail.wrap(sandbox, command, view, env, jail.Limits(address_space=4 << 30))
    # The output goes to a file outside the scratch, not a pipe: a child the probe leaves behind
    # would hold a pipe open, and the doctor would wait on it to the deadline instead of on the probe.
    with tempfile.TemporaryFile(dir=bait.folder) as out, tempfile.TemporaryFile(dir=bait.folder) as err:
        try:
            subprocess.run(argv, env=launcher_env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                           timeout=PROBE_TIMEOUT, preexec_fn=jail.preexec(jail.Limits()),  # noqa: PLW1509
                           start_new_session=True)
            prefix = ""
        except subprocess.TimeoutExpired:
            prefix = "timed out; "
        out.seek(0)
        err.seek(0)
        output = prefix + (out.read(1 << 20) + err.read(1 << 20)).decode("utf-8", "replace")
    try:
        said = json.loads(output.strip().splitlines()[0]) if output.strip().startswith("[") else [output.strip()]
    except ValueError:
        said = [output.strip()]
    return _judge(name, title, said, output, bait, scratch)


def _judge(name: str, title: str, said: list[str], output: str, bait: Bait, scratch: Path) -> ProbeResult:
    leaked = bait.secret in output
    if name in ("read_home", "read_workdir", "read_environ"):
        held = not leaked and bait.env_name not in output
        detail = "the secret came back" if not held else "; ".join(said)[:300]
        if name == "read_environ" and held:
            readable = sum(1 for line in said if "=" in line)
            detail = f"no planted key in the {readable} environments it could read"
        if name != "read_environ" and not any(p for p in bait.planted if p.name.endswith(bait.tag)):
            detail += " (nothing could be planted here: not tested)"
        return ProbeResult(name, title, held, detail)
    if name == "write_outside":
        written = [path for path in bait.write_targets() if os.path.exists(path)]
        return ProbeResult(name, title, not written, f"files appeared: {', '.join(written)}" if written
                           else "nothing written outside the scratch")
    if name == "connect":
        reached = bait.connections > 0 or any("connected" in line for line in said)
        return ProbeResult(name, title, not reached,
                           f"{bait.connections} connection(s) reached the listeners" if reached else "; ".join(said))
    if name == "detach":
        time.sleep(SURVIVOR_DELAY + 1.0)
        survivors = _survivors(bait.tag)
        marker = (scratch / "survivor").exists()
        for pid in survivors:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        held = not survivors and not marker
        detail = "the detached child died with the jail" if held else \
            f"survivors {survivors}, marker written after the evaluation: {marker}"
        return ProbeResult(name, title, held, detail)
    if name == "kill_parent":
        try:  # a SIGKILL takes effect when the stand-in is next scheduled
            bait.stand_in.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        alive = bait.stand_in.poll() is None
        return ProbeResult(name, title, alive, ("the driver's stand-in is alive; " if alive else
                                                "the driver's stand-in was killed; ") + "; ".join(said))
    raise KeyError(name)


def forge_probe(sandbox: jail.Sandbox) -> ProbeResult:
    """A genome that rewrites what its process sends, so that its fitness reads 42, scored in a
    real worker (static check off) beside the honest loss: held if it gets what the honest one
    gets. Needs the executor's jail-only mode and a plug-in with a trusted scoring phase."""
    import inspect
    import warnings

    from engine.executor import ProcessExecutor

    title = "forge its own score"
    if "jail_only" not in inspect.signature(ProcessExecutor).parameters:
        return ProbeResult("forge_score", title, False, "not run: this build has no jail-only mode")
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ProcessExecutor("synthetic-pref", workers=1, timeout=120, sandbox=sandbox, jail_only=True) as executor:
            executor.run([(0, HONEST), (1, FORGER)], seed=0, decide=None,
                         on_result=lambda r: results.__setitem__(r.candidate_id, r))
    honest, forged = results[0], results[1]
    if honest.fitness is None:
        return ProbeResult("forge_score", title, False, f"could not be judged: the honest loss itself scored "
                                                        f"{honest.status} ({honest.error})")
    held = forged.fitness is not None and forged.fitness != 42.0 and forged.fitness == honest.fitness
    return ProbeResult("forge_score", title, held,
                       f"scored {forged.fitness} ({forged.status}); the same loss, honest, scored {honest.fitness}")


#: Plain Python in a genome's own process: every way it knows to read a file the plug-in hides from
#: genomes (``SandboxNeeds.hidden_from_genome``) or to get the power to uncover it.
UNCOVER = """def dpo(a, b, c, d):
    import ctypes, os
    import torch.nn.functional as F2
    libc = ctypes.CDLL(None, use_errno=True)
    path = PATH
    found = []
    def grab(where):
        try:
            found.append(open(where).read())
        except OSError:
            pass
    grab(path)
    libc.umount2(path.encode(), 2)
    grab(path)
    if libc.unshare(0x10000000 | 0x00020000) == 0:
        found.append("made a user namespace")
        libc.umount2(path.encode(), 2)
        grab(path)
    grab(f"/proc/{os.getppid()}/root{path}")
    if any(found):
        raise ValueError("UNCOVERED " + repr(found))
    return -F2.logsigmoid(0.1 * ((a - c) - (b - d)))
"""


class TrustedFilesProbe(SyntheticPreference):
    """synthetic-pref with one file that only its trusted phase may read (for :func:`hidden_probe`)."""

    def __init__(self, path: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.path = path

    def sandbox_needs(self) -> SandboxNeeds:
        return SandboxNeeds(hidden_from_genome=(self.path,))


def hidden_probe(sandbox: jail.Sandbox) -> ProbeResult:
    """A genome (plain Python, static check off, in a real worker) that tries to read a file the
    plug-in hides from genomes, to unmount its cover, to make a user namespace and to read it
    through its parent's root: held if the evaluation scores as plain DPO and nothing came back."""
    import warnings

    from engine.executor import ProcessExecutor

    title = "read a file only the trusted phase may read"
    if not sandbox.jailed:
        return ProbeResult("hidden_file", title, False, "no OS jail: nothing is hidden")
    folder = Path(tempfile.mkdtemp(prefix="evoloss-doctor-trusted-"))
    secret = f"TRUSTED-{secrets.token_hex(8)}"
    try:
        (folder / "questions.jsonl").write_text(secret)
        path = str(folder / "questions.jsonl")
        results = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ProcessExecutor(f"{__name__}:TrustedFilesProbe", {"path": path}, workers=1, timeout=120,
                                 sandbox=sandbox, jail_only=True) as executor:
                executor.run([(0, UNCOVER.replace("PATH", repr(path)))], 0, None, results.append)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    (result,) = results
    leaked = secret in (result.error or "") or "UNCOVERED" in (result.error or "")
    held = result.ok and not leaked
    return ProbeResult("hidden_file", title, held, "covered, and no way found to uncover it" if held else
                       f"{result.status}: {result.error}"[:300])


#: A plain-Python genome (static check off) that finds its plug-in and evaluation seed on the
#: stack, rebuilds its own problem every way it can think of, compares each with the training
#: data it was given, tries to read the key file, and reports in its error line.
REBUILDER = '''def rebuild(PARAMS):
    import os, sys
    import torch
    import fitness.truth as truth
    frame, plugin, where = sys._getframe(1), None, None
    while frame is not None:
        here = frame.f_locals
        owner = here.get("self")
        if "seed" in here and hasattr(owner, "_make_problem"):
            plugin, where = owner, ("single", here["seed"])
            break
        if "seed" in here and "task" in here and hasattr(owner, "build_problem"):
            plugin, where = owner, ("suite", here["task"], here["seed"])
            break
        frame = frame.f_back
    if plugin is None:  # the contract checks: behave like a loss
        return FALLBACK
    def first_tensor(value):
        if isinstance(value, torch.Tensor):
            return value
        for name in getattr(value, "__dataclass_fields__", {}):
            found = first_tensor(getattr(value, name))
            if found is not None:
                return found
        return None
    if where[0] == "single":
        real = first_tensor(plugin.train_problem(where[1]))
        build = lambda: plugin._make_problem(where[1])[0]
    else:
        real = first_tensor(plugin.training_data(where[1], where[2]))
        build = lambda: plugin.build_problem(where[1], where[2])[0]
    found, notes = [], []
    def short(exc):  # the error line is bounded: TruthKeyError -> TKE
        return "".join(c for c in type(exc).__name__ if c.isupper())
    def attempt(name):
        try:
            if torch.equal(first_tensor(build()), real):
                found.append(name)
        except Exception as exc:
            notes.append(name + ":" + short(exc))
    attempt("d")
    truth._in_builder = True
    attempt("f")
    path = os.environ.get(truth.ENV, "")
    for name, where_read in (("k", path), ("i", "/proc/1/root" + path),
                             ("w", "/proc/%d/root%s" % (os.getppid(), path))):
        try:
            notes.append(name + ":%dB" % len(open(where_read, "rb").read()))
        except Exception as exc:
            notes.append(name + ":" + short(exc))
    try:
        from sklearn.datasets import load_digits
        notes.append("g:%d" % len(load_digits().target))
    except Exception as exc:
        notes.append("g:" + short(exc))
    os.environ.pop(truth.ENV, None)
    attempt("p")
    raise RuntimeError("REBUILT=" + ",".join(found) + " NOTES=" + ",".join(notes))
'''


def rebuilder(interface: str = "preference") -> str:
    """:data:`REBUILDER` as a loss of ``interface`` (``preference`` or ``classification``)."""
    if interface == "classification":
        params, fallback = "logits, targets", "torch.nn.functional.cross_entropy(logits, targets, reduction='none')"
    else:
        params, fallback = "self, a, b, c, d", "-torch.nn.functional.logsigmoid(self.beta * ((a - b) - (c - d)))"
    return REBUILDER.replace("PARAMS", params).replace("FALLBACK", fallback)


def rebuild_probe(sandbox: jail.Sandbox) -> ProbeResult:
    """:data:`REBUILDER` in a real worker (static check off) on ``synthetic-pref`` with a truth
    key made for the probe: held if no way it tries rebuilds the problem it is trained on."""
    import re
    import warnings

    from engine.executor import ProcessExecutor
    from fitness import truth

    title = "rebuild its problem's true reward from the seed"
    if not sandbox.jailed:
        return ProbeResult("rebuild_truth", title, False, "no OS jail: the key file is not hidden")
    folder = Path(tempfile.mkdtemp(prefix="evoloss-doctor-key-"))
    previous = os.environ.get(truth.ENV)
    results = []
    try:
        truth.write_key(folder / "truth.key", secrets.token_bytes(truth.KEY_BYTES))
        truth.use(folder / "truth.key")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ProcessExecutor("synthetic-pref", workers=1, timeout=120, sandbox=sandbox,
                                 jail_only=True) as executor:
                executor.run([(0, rebuilder())], 0, None, results.append)
    finally:
        truth.use(Path(previous) if previous else None)
        shutil.rmtree(folder, ignore_errors=True)
    (result,) = results
    found = re.search(r"REBUILT=(\S*) NOTES=(\S*)", result.error or "")
    if found is None:
        return ProbeResult("rebuild_truth", title, False, f"could not be judged: {result.status}: {result.error}"[:300])
    held = found.group(1) == ""
    return ProbeResult("rebuild_truth", title, held,
                       "no way found: its builder refuses without the key, and the key file is covered "
                       f"({found.group(2)})" if held else f"rebuilt by: {found.group(1)}")


def run_doctor(mode: str = "auto", as_json: bool = False, probes: list[str] | None = None) -> int:
    """Print the sandbox ``mode`` gives here and the probes' verdicts; 0 if all held, else 1.

    Raises:
        jail.SandboxUnavailable: for an explicit sandbox that cannot run here (exit code 2).
    """
    from engine.plugins import load_fitness

    jail.mark_not_dumpable()  # as the run's driver does
    candidates = {kind: jail.probe(kind) for kind in ("bwrap", "unshare")}
    sandbox = jail.choose(mode)
    plugin = load_fitness("synthetic-pref")
    bait = Bait()
    results: list[ProbeResult] = []
    try:
        bait.plant()
        view_parts = jail.worker_view_parts([plugin], run_dir=bait.run_dir) if sandbox.jailed else {}
        for name in [p for p in probes or list(PROBES) if p in PROBES]:
            results.append(run_probe(name, sandbox, bait, view_parts))
    finally:
        bait.remove()
    if probes is None or "forge_score" in probes:
        results.append(forge_probe(sandbox))
    if probes is None or "hidden_file" in probes:
        results.append(hidden_probe(sandbox))
    if probes is None or "rebuild_truth" in probes:
        results.append(rebuild_probe(sandbox))
    held = all(r.held for r in results)
    if as_json:
        print(json.dumps({"sandbox": sandbox.kind, "reason": sandbox.reason, "requested": mode,
                          "candidates": {k: v or "works" for k, v in candidates.items()},
                          "probes": [asdict(r) for r in results], "held": held}))
    else:
        print(sandbox.describe())
        for kind, problem in candidates.items():
            print(f"  {kind:8} {'works' if problem is None else problem}")
        if sandbox.warning:
            print(sandbox.warning)
        print("probes (plain Python in a worker's jail, as a genome past the static check would run):")
        for result in results:
            print(f"  {'held    ' if result.held else 'NOT HELD'}  {result.title}: {result.detail}")
        print(f"{sum(r.held for r in results)} of {len(results)} probes held")
    return 0 if held else 1
