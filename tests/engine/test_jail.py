"""The OS jail (engine.jail): choosing a sandbox, the file view it builds, and hostile code run
through real jails (bubblewrap and unshare), judged from outside: no secret comes back, no file
appears outside the scratch folder, no connection arrives, no process survives."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import doctor, jail
from engine.cli import main
from engine.executor import LOG_LIMIT_BYTES, ProcessExecutor, scrubbed_environment

JAILS = [pytest.param(kind, marks=pytest.mark.skipif(jail.probe(kind) is not None, reason=str(jail.probe(kind))))
         for kind in ("bwrap", "unshare")]
DPO = "def dpo(a, b, c, d):\n    return -F.logsigmoid(0.1 * ((a - c) - (b - d)))\n"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A home folder and a working folder each holding a secret file, and API keys in the
    driver's environment."""
    secret = "sk-planted-" + os.urandom(6).hex()
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / ".netrc").write_text(secret)
    (work / ".env").write_text(f"OPENAI_API_KEY={secret}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for name in ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "EVOLOSS_TEST_SECRET"):
        monkeypatch.setenv(name, secret)
    return {"secret": secret, "home": home, "work": work}


# -- choosing ---------------------------------------------------------------------------------
def test_none_is_chosen_only_when_asked_and_warns():
    sandbox = jail.choose("none")
    assert sandbox.kind == "none" and "asked for" in sandbox.reason
    assert "WITHOUT an OS jail" in sandbox.warning


def test_unknown_sandbox_is_refused():
    with pytest.raises(jail.SandboxUnavailable, match="must be one of auto, bwrap, unshare, none"):
        jail.choose("docker")


@pytest.fixture
def no_bwrap(monkeypatch):
    """This machine as if bubblewrap were not installed."""
    real_which = jail.shutil.which
    monkeypatch.setattr(jail.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name))
    jail.probe.cache_clear()
    yield
    jail.probe.cache_clear()


def test_auto_falls_back_from_a_missing_bwrap_and_says_so(no_bwrap):
    sandbox = jail.choose("auto")
    assert sandbox.kind in ("unshare", "none")
    assert "bwrap is not installed" in sandbox.reason and "bubblewrap" in sandbox.reason


def test_explicit_bwrap_that_cannot_run_exits_2_with_a_clear_message(no_bwrap, tmp_path, capsys):
    (tmp_path / "loss.py").write_text(DPO)
    code = main(["evaluate", "--code", str(tmp_path / "loss.py"), "--sandbox", "bwrap", "--json"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--sandbox bwrap: bwrap is not installed; install bubblewrap (apt-get install bubblewrap)" in err


def test_run_refuses_an_explicit_sandbox_that_cannot_run_before_making_its_folder(no_bwrap, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--sandbox", "bwrap", "--pop", "2", "--gens", "0", "--out", str(out), "--quiet"]) == 2
    assert "--sandbox bwrap" in capsys.readouterr().err
    assert not out.exists()


# -- the file view ----------------------------------------------------------------------------
def test_view_shows_the_project_packages_but_not_the_folder_holding_them(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    root = Path(jail.__file__).resolve().parents[1]
    view = jail.View(scratch=scratch, read_only=jail.interpreter_paths() + jail.project_paths(),
                     hide=[Path.home(), root], workdir=root)
    mounted = {path: kind for kind, path in jail.plan(view).mounts}
    assert mounted[root / "engine"] == "ro" and mounted[scratch.resolve()] == "rw"
    assert root not in mounted or mounted[root] == "tmpfs"
    assert not any(kind != "tmpfs" and jail._under(root, path) for path, kind in mounted.items())


def test_view_refuses_to_show_root_or_a_hidden_folder(tmp_path):
    with pytest.raises(jail.SandboxUnavailable, match="refusing to show '/'"):
        jail.plan(jail.View(scratch=tmp_path, read_only=[Path("/")]))
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(jail.SandboxUnavailable, match="a folder the jail hides"):
        jail.plan(jail.View(scratch=tmp_path / "s", read_only=[data], hide=[data]))


def test_environment_drops_secrets_by_name():
    env = scrubbed_environment({"LANG": "C.UTF-8", "LC_API_KEY": "x", "PATH": "/usr/bin", "AWS_PROFILE": "p",
                                "HF_HOME": "/models", "OPENAI_API_KEY": "sk"})
    assert env["LANG"] == "C.UTF-8" and env["HF_HOME"] == "/models"
    assert not {"LC_API_KEY", "AWS_PROFILE", "OPENAI_API_KEY"} & set(env)


# -- hostile probes through real jails --------------------------------------------------------
@pytest.mark.parametrize("kind", JAILS)
@pytest.mark.parametrize("probe", list(doctor.PROBES))
def test_probe_is_held(kind, probe, planted):
    bait = doctor.Bait()
    try:
        bait.plant()
        parts = jail.worker_view_parts([], run_dir=bait.run_dir)
        result = doctor.run_probe(probe, jail.choose(kind), bait, parts)
        leftovers = doctor._survivors(bait.tag)
    finally:
        bait.remove()
    assert result.held, result.detail
    assert bait.secret not in result.detail and planted["secret"] not in result.detail
    assert leftovers == []


@pytest.mark.parametrize("probe", ["read_home", "write_outside", "connect", "detach", "kill_parent"])
def test_probes_catch_an_unjailed_worker(probe, planted):
    """The judges can fail: without a jail the same probes get through."""
    bait = doctor.Bait()
    try:
        bait.plant()
        result = doctor.run_probe(probe, jail.choose("none"), bait, {})
    finally:
        bait.remove()
    assert not result.held


HOSTILE_PLUGIN = '''
import json, os, socket, time
import torch
from fitness import Fitness, Interface, Score, Seed
from fitness.preference import PreferenceInterface

ARGS = json.loads({args!r})

class Hostile(Fitness):
    """Does in evaluate() what an escaped genome would: plain Python inside the worker."""
    name = "hostile"
    interface = PreferenceInterface()

    def seeds(self):
        return []

    def evaluate(self, fn, seed):
        seen = []
        for path in ARGS["reads"]:
            try:
                seen.append(open(path).read() if os.path.isfile(path) else str(os.listdir(path)))
            except OSError as exc:
                seen.append(f"{{path}}: {{exc.strerror}}")
        for entry in os.listdir("/proc"):
            try:
                seen.append(open(f"/proc/{{entry}}/environ", "rb").read().decode(errors="replace"))
            except OSError:
                pass
        seen.append(str(dict(os.environ)))
        for path in ARGS["writes"]:
            try:
                open(path, "w").write("escaped")
            except OSError:
                pass
        try:
            socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=2).close()
        except OSError:
            pass
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1.0)
                try:
                    open(ARGS["late_marker"], "w").write("outlived")
                except OSError:
                    pass
                with open(os.path.join(os.environ["HOME"], "late"), "w") as handle:
                    handle.write("outlived")
                time.sleep(60)
            os._exit(0)
        os.wait()
        print("\\n".join(seen))  # into the worker log
        return Score(1.0, {{"seen": seen}})  # and into what evaluate prints and stores
'''


@pytest.mark.parametrize("kind", JAILS)
def test_hostile_plugin_code_in_a_worker_is_held(kind, planted, tmp_path, capsys):
    """Plain Python in the worker (where a genome runs) reads, writes, connects and detaches; the
    evaluation still ends with one JSON status, and nothing of it reaches the user's files, the
    listener or the output."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    home, work = planted["home"], planted["work"]
    late_marker = tmp_path / "late-marker"
    args = {"reads": [str(home / ".netrc"), str(work / ".env"), str(home), str(work)],
            "writes": [str(home / "escaped"), str(work / "escaped"), str(tmp_path / "escaped")],
            "port": listener.getsockname()[1], "late_marker": str(late_marker)}
    plugin = tmp_path / "hostile.py"
    plugin.write_text(HOSTILE_PLUGIN.format(args=json.dumps(args)))
    (work / "loss.py").write_text(DPO)
    code = main(["evaluate", "--fitness", f"{plugin}:Hostile", "--code", "loss.py", "--sandbox", kind, "--json",
                 "--timeout", "60"])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    payload = json.loads(lines[0])
    assert code == 0 and payload["status"] == "ok" and payload["sandbox"] == kind, payload
    assert planted["secret"] not in out + err
    assert len(payload["metrics"]["seen"]) > 4  # the plug-in did run and reported what it saw
    time.sleep(2.0)  # the detached grandchild would have written by now
    assert not late_marker.exists()
    assert not any(p.exists() for p in (home / "escaped", work / "escaped", tmp_path / "escaped"))
    assert accepted == []
    assert sorted(p.name for p in work.iterdir()) == [".env", "loss.py"]
    listener.close()


@pytest.mark.parametrize("kind", JAILS)
def test_worker_holds_no_descriptor_to_the_run_folder(kind, tmp_path, write_plugin):
    spec = write_plugin('''
import os, torch
from fitness import Fitness, Score
from fitness.preference import PreferenceInterface

class Fds(Fitness):
    name = "fds"
    interface = PreferenceInterface()

    def seeds(self):
        return []

    def evaluate(self, fn, seed):
        print("x" * 3000)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return Score(1.0, {"fds": links, "cwd": os.getcwd(), "home": os.environ["HOME"]})
''', class_name="Fds")
    run = tmp_path / "run"
    run.mkdir()
    results = []
    with ProcessExecutor(spec, workers=1, timeout=60, log_path=run / "workers.log", sandbox=kind) as executor:
        executor.run([(0, DPO)], seed=0, decide=None, on_result=results.append)
    assert results[0].status == "ok", results[0].error
    links = results[0].metrics["fds"]
    assert not [link for link in links if str(run) in link], links
    assert "x" * 3000 in (run / "workers.log").read_text()  # output still reaches the log, through a pipe
    assert results[0].metrics["home"] != str(Path.home())


def test_worker_output_is_capped(tmp_path, write_plugin, monkeypatch):
    monkeypatch.setattr("engine.executor.LOG_LIMIT_BYTES", 20_000)
    spec = write_plugin('''
from fitness import Fitness, Score
from fitness.preference import PreferenceInterface

class Loud(Fitness):
    name = "loud"
    interface = PreferenceInterface()

    def seeds(self):
        return []

    def evaluate(self, fn, seed):
        for _ in range(2000):
            print("flood " * 100)
        return Score(1.0)
''', class_name="Loud")
    log = tmp_path / "workers.log"
    results = []
    with ProcessExecutor(spec, workers=1, timeout=60, log_path=log) as executor:
        executor.run([(0, DPO)], seed=0, decide=None, on_result=results.append)
    assert results[0].status == "ok", results[0].error
    text = log.read_text()
    assert len(text) < 20_000 + 5_000 and "bytes dropped" in text
    assert LOG_LIMIT_BYTES >= 1 << 20  # the real cap leaves room for useful output


# -- the driver -------------------------------------------------------------------------------
def _unprivileged() -> list[str]:
    """Run as this uid with no capabilities (root's CAP_SYS_PTRACE overrides the mark, and a
    process with more capabilities than its reader is unreadable anyway)."""
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.getuid() == 0 else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
@pytest.mark.parametrize("mark", [True, False])
def test_non_dumpable_driver_environment_is_unreadable(mark):
    secret = "sk-driver-" + os.urandom(6).hex()
    target = subprocess.Popen(
        _unprivileged() + [sys.executable, "-c", f"import sys, time\nfrom engine.jail import mark_not_dumpable\n"
                               f"{'assert mark_not_dumpable()' if mark else ''}\nprint('ready', flush=True)\n"
                               "time.sleep(60)"],
        env={**os.environ, "EVOLOSS_DRIVER_SECRET": secret}, stdout=subprocess.PIPE)
    try:
        assert target.stdout.readline().strip() == b"ready"
        read = subprocess.run(_unprivileged() + [sys.executable, "-I", "-S", "-c",
                                                 f"print(open('/proc/{target.pid}/environ').read())"],
                              capture_output=True, text=True)
    finally:
        target.kill()
        target.wait()
    if mark:
        assert read.returncode != 0 and "Permission denied" in read.stderr
        assert secret not in read.stdout
    else:
        assert secret in read.stdout


# -- the same probes as genomes: evaluate --jail-only ----------------------------------------
GENOME = '''def probe(a, b, c, d):
    import json, os, signal, socket, sys, time
    import torch.nn.functional as F2
    ARGS = json.loads({args!r})
    if not os.environ.get("PROBED"):
        os.environ["PROBED"] = "1"
{body}
    return -F2.logsigmoid(0.1 * ((a - c) - (b - d)))
'''
GENOME_PROBES = {
    "read_home": '''seen = []
for path in (ARGS["home"] + "/.netrc", ARGS["home"]):
    try:
        seen.append(open(path).read() if os.path.isfile(path) else str(os.listdir(path)))
    except OSError as exc:
        seen.append(exc.strerror)
raise ValueError("seen: " + " ; ".join(seen).replace("\\\\n", " "))''',
    "read_workdir": '''seen = []
for path in (ARGS["work"] + "/.env", ARGS["run"] + "/run.sqlite", ARGS["work"]):
    try:
        seen.append(open(path).read() if os.path.isfile(path) else str(os.listdir(path)))
    except OSError as exc:
        seen.append(exc.strerror)
raise ValueError("seen: " + " ; ".join(seen).replace("\\\\n", " "))''',
    "read_environ": '''seen = [str(dict(os.environ))]
for entry in os.listdir("/proc"):
    try:
        seen.append(open("/proc/" + entry + "/environ", "rb").read().decode(errors="replace").replace("\\\\0", " "))
    except OSError:
        pass
raise ValueError("seen: " + " ; ".join(seen).replace("\\\\n", " "))''',
    "write_outside": '''for path in ARGS["writes"]:
    try:
        open(path, "w").write("escaped")
    except OSError:
        pass''',
    "connect": '''try:
    socket.create_connection(("127.0.0.1", ARGS["port"]), timeout=2).close()
except OSError:
    pass''',
    "detach": '''if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)  # " + ARGS["tag"]])
    os._exit(0)
os.wait()''',
    "kill_parent": '''for pid in (os.getppid(), ARGS["stand_in"]):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass''',
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", JAILS)
@pytest.mark.parametrize("probe", list(GENOME_PROBES))
def test_genome_probe_through_evaluate_jail_only_is_held(kind, probe, planted, tmp_path, capsys):
    """Each probe as a plain-Python genome (static check off) through a real worker: one JSON
    status, no secret in it, nothing written outside, no connection, no survivor, the driver's
    stand-in alive."""
    work, home = planted["work"], planted["home"]
    run = work / "runs" / "earlier"
    run.mkdir(parents=True)
    (run / "run.sqlite").write_text(planted["secret"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stand_in = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(120)"])
    tag = "evoloss-probe-" + os.urandom(4).hex()
    args = {"home": str(home), "work": str(work), "run": str(run), "port": listener.getsockname()[1],
            "writes": [str(home / "escaped"), str(work / "escaped"), str(tmp_path / "escaped"), "/tmp/escaped-" + tag],
            "tag": tag, "stand_in": stand_in.pid}
    body = "\n".join("        " + line for line in GENOME_PROBES[probe].splitlines())
    (work / "probe.py").write_text(GENOME.format(args=json.dumps(args), body=body))
    try:
        main(["evaluate", "--code", "probe.py", "--jail-only", "--sandbox", kind, "--json", "--timeout", "60"])
        out, err = capsys.readouterr()
        deadline = time.monotonic() + 5.0  # a killed namespace's processes take a moment to go
        while (survivors := doctor._survivors(tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            listener.accept()
            connected = True
        except OSError:
            connected = False
        stand_in_alive = stand_in.poll() is None
    finally:
        for pid in doctor._survivors(tag):
            os.kill(pid, 9)
        stand_in.kill()
        stand_in.wait()
        listener.close()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, (out, err[-2000:])
    payload = json.loads(lines[0])
    assert payload["sandbox"] == kind and payload["static_check"] is False
    assert planted["secret"] not in out + err
    assert not any(os.path.exists(path) for path in args["writes"])
    assert not connected, payload
    assert survivors == [], payload
    assert stand_in_alive, payload
