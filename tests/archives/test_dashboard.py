"""The dashboard's server side: every endpoint through Starlette's test client, following a run
in progress, escaping, errors, the ``serve`` command."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette", reason="the dashboard needs the serve extra: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from archives.dashboard import views  # noqa: E402
from archives.dashboard.app import CSP, create_app  # noqa: E402
from archives.dashboard.library import run_status  # noqa: E402
from archives.store import RunStore  # noqa: E402
from engine.candidate import Candidate, EvalResult  # noqa: E402
from tests.archives.conftest import FAILED_HOSTILE_ID, HOSTILE, HOSTILE_ID  # noqa: E402
from tests.fixtures.runs import build_run  # noqa: E402


@pytest.fixture(scope="module")
def client(dashboard_runs):
    with TestClient(create_app(dashboard_runs, min_interval=0.0)) as test_client:
        yield test_client


def get_json(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.text
    return response.json()


# -- runs page ------------------------------------------------------------------------------------
def own_evaluations(run_dir) -> int:
    """The run's own evaluations (not re-measurements), each candidate's first score: duplicates are not counted."""
    store = RunStore.open(run_dir)
    try:
        return sum(1 for _, result in store.evaluations() if result.status != "duplicate")
    finally:
        store.close()


def test_runs_api_lists_each_run_with_status_best_and_cost(client, dashboard_runs):
    runs = {run["key"]: run for run in get_json(client, "/api/runs")["runs"]}
    assert set(runs) == {"regression", "preference"}
    real = runs["regression"]
    assert real["fitness"] == "robust-regression" and real["operators"] == ["symbolic"]
    assert real["status"] == "finished" and real["evaluations"] == own_evaluations(dashboard_runs / "regression")
    assert 10 <= real["evaluations"] <= 12 and real["generations"] == 3  # 4 seeds/offspring x 3, less duplicates
    assert real["baseline"] == "mse" and real["delta"] == pytest.approx(real["best_fitness"] - real["baseline_fitness"])
    preference = runs["preference"]
    assert preference["best_id"] == HOSTILE_ID and preference["best_name"] == HOSTILE
    assert preference["llm_calls"] == 6 and preference["llm_cost_usd"] == pytest.approx(0.041)


def test_runs_page_is_a_shell_for_the_table(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="runs-table"' in page.text and 'data-page="runs"' in page.text
    assert page.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
    assert "<script>" not in page.text  # scripts come from files only (no inline script)


def test_history_per_generation_for_comparison(client, dashboard_runs):
    history = get_json(client, "/api/runs/regression/history")
    assert history["x_label"] == "generation" and history["x"] == [0, 1, 2]
    # Each generation's best as the run logged it (a raced run's best is a lower bound, which later
    # re-measurements and the baseline's seeds may move down as well as up).
    store = RunStore.open(dashboard_runs / "regression", readonly=True)
    logged = [entry["record"]["best"] for entry in store.generations()]
    store.close()
    assert history["best"] == pytest.approx(logged)


# -- run page -------------------------------------------------------------------------------------
def test_run_page_renders_the_summary(client, dashboard_runs):
    page = client.get("/runs/regression")
    assert page.status_code == 200
    for expected in ('id="fitness-plot"', 'id="archive-plot"', 'id="operators-table"', "robust-regression",
                     'id="stat-evaluations"', 'data-key="regression"'):
        assert expected in page.text
    assert get_json(client, "/api/runs/regression")["summary"]["evaluations"] == own_evaluations(
        dashboard_runs / "regression")


def test_run_api_has_points_elites_operators_and_llm_timeline(client):
    view = get_json(client, "/api/runs/preference")
    summary = view["summary"]
    assert [a["name"] for a in summary["axes"]] == ["slope_at_zero", "left_tail_growth", "code_size"]
    assert {e["id"] for e in view["elites"]} >= {HOSTILE_ID}
    assert all(len(e["cell"]) == 3 for e in view["elites"])
    assert len(view["points"]) == 8  # the scored evaluations
    operators = {row["operator"]: row for row in view["operators"]}
    assert operators["llm:mutate"]["made"] == 5 and operators["llm:mutate"]["valid"] == 4
    assert operators["seed"]["choice_probability"] is None
    assert len(view["llm_timeline"]["cost_usd"]) == 6 and view["llm_timeline"]["cost_usd"][-1] == pytest.approx(0.041)
    kinds = {f["kind"]: f for f in summary["failure_kinds"]}
    assert any(f["example_id"] == FAILED_HOSTILE_ID for f in kinds.values())


def test_choice_probabilities_follow_the_chooser():
    rewards = {"good": [1.0] * 40, "bad": [0.0] * 40}
    thompson = views.choice_probabilities("bandit", rewards, ["good", "bad"])
    assert thompson["good"] > 0.99 and sum(thompson.values()) == pytest.approx(1.0)
    even = views.choice_probabilities("bandit", {"a": [1, 0] * 10, "b": [0, 1] * 10}, [])
    assert 0.4 < even["a"] < 0.6
    assert views.choice_probabilities("ucb", rewards, ["good", "bad", "new"]) == {"good": 0.0, "bad": 0.0, "new": 1.0}
    assert views.choice_probabilities("ucb", rewards, []) == {"good": 1.0, "bad": 0.0}
    assert views.choice_probabilities("uniform", rewards, ["x"]) == {"x": 1 / 3, "good": 1 / 3, "bad": 1 / 3}


def test_run_status_tells_finished_running_stopped_and_interrupted():
    summary = {"stopped": None, "last_generation": 1, "evaluations": 8}
    config = {"gens": 3}
    now = time.time()
    assert run_status(summary, config, now - 5, now=now) == "running"
    assert run_status(summary, config, now - 3600, now=now) == "interrupted"
    assert run_status({**summary, "last_generation": 3}, config, now - 3600, now=now) == "finished"
    assert run_status({**summary, "stopped": {"generation": 1, "reason": "budget"}}, config, now, now=now) == "stopped"
    assert run_status(summary, {"gens": 3, "max_evals": 8}, now - 3600, now=now) == "finished"


# -- live -----------------------------------------------------------------------------------------
def test_events_follow_a_run_in_progress_without_reading_it_again(tmp_path, monkeypatch):
    from archives.dashboard import library

    run_dir = build_run(tmp_path / "runs" / "live")
    writer = RunStore.open(run_dir)
    writer.set_meta("config", {**writer.meta("config"), "gens": 5})  # generations 3 to 5 still to come
    writer.close()
    reads = []
    real_read = library.read_run
    monkeypatch.setattr(library, "read_run", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    with TestClient(create_app(tmp_path / "runs", min_interval=0.0)) as test_client:
        first = get_json(test_client, "/api/runs/live/events?after=-1")
        assert [row["candidate_id"] for row in first["evaluations"]] == list(range(10))
        cursor, version = first["cursor"], first["version"]
        assert get_json(test_client, f"/api/runs/live/events?after={cursor}")["evaluations"] == []
        writer = RunStore.open(run_dir)
        writer.add_candidates([Candidate(10, "fresh", "def fresh(a):\n    return a\n", "", (7,), "llm:mutate", 3, "h")])
        writer.add_evaluation(EvalResult(10, "ok", 0.9, {}, {"slope_at_zero": 0.0, "left_tail_growth": 0.0}),
                              "synthetic-pref")
        writer.close()
        news = get_json(test_client, f"/api/runs/live/events?after={cursor}")
        assert [(row["candidate_id"], row["name"], row["fitness"]) for row in news["evaluations"]] == [(10, "fresh", 0.9)]
        assert news["version"] > version and news["status"] == "running"
        view = get_json(test_client, "/api/runs/live")
        assert view["summary"]["best_id"] == 10 and view["summary"]["evaluations"] == 11
        assert get_json(test_client, "/api/runs/live/candidates/10")["parents"] == [7]
        assert get_json(test_client, f"/api/runs/live/events?after={news['cursor']}")["evaluations"] == []
    assert len(reads) == 1  # read once, then only the new rows


def test_refreshed_run_matches_a_fresh_read(tmp_path):
    from archives.reading import read_run, refresh_run
    from archives.replay import summarize

    run_dir = build_run(tmp_path / "run")
    store = RunStore.open(run_dir, readonly=True)
    data = read_run(store)
    store.close()
    writer = RunStore.open(run_dir)
    writer.add_candidates([Candidate(10, "late", "def late(a):\n    return a\n", "", (4,), "llm:mutate", 3, "h")])
    writer.add_evaluation(EvalResult(10, "ok", 0.8, {}, {"slope_at_zero": 0.9, "left_tail_growth": 3.9}),
                          "synthetic-pref")
    writer.add_evaluation(EvalResult(10, "ok", 0.1), "other-fitness")
    call = writer.add_llm_call(operator="llm", model="m", kind="mutate", attempt=1, prompt="[]", reply="r")
    writer.link_llm_calls([call], 10)
    writer.finish_generation(3, {"gen": 3, "evals": 1, "ok": 1, "max": 0.8, "mean": 0.8, "best": 0.8}, {})
    writer.close()
    store = RunStore.open(run_dir, readonly=True)
    new = refresh_run(store, data)
    fresh = read_run(store)
    store.close()
    assert len(new) == 2 and data.cursor == fresh.cursor
    assert summarize(None, data=data) == summarize(None, data=fresh)
    assert data.extra["other-fitness"][10].fitness == 0.1


# -- candidate and lineage ------------------------------------------------------------------------
def test_candidate_page_shows_code_diff_lineage_and_evaluations(client, dashboard_runs):
    store = RunStore.open(dashboard_runs / "regression", readonly=True)
    candidates = {c.id: c for c in store.candidates()}
    store.close()
    # A grandchild: its parent has a parent too, so the parent's tree has nodes on both sides.
    child = next(c for c in candidates.values() if len(c.parents) == 1 and candidates[c.parents[0]].parents)
    page = client.get(f"/runs/regression/candidates/{child.id}")
    assert page.status_code == 200
    assert 'class="highlight"' in page.text  # Pygments
    assert f'href="/runs/regression/candidates/{child.parents[0]}"' in page.text
    assert "Diff against parent" in page.text
    assert '<span class="gd">' in page.text or '<span class="gi">' in page.text  # removed or added lines
    report = get_json(client, f"/api/runs/regression/candidates/{child.id}")
    assert report["evaluations"][0]["fitness_name"] == "robust-regression"
    assert report["parents_detail"][0]["diff"].startswith("---")
    tree = get_json(client, f"/api/runs/regression/candidates/{child.parents[0]}/tree")
    ids = {node["id"] for node in tree["nodes"]}
    assert child.id in ids and child.parents[0] in ids and [child.parents[0], child.id] in tree["edges"]
    assert any(node["depth"] > 0 for node in tree["nodes"]) and any(node["depth"] < 0 for node in tree["nodes"])


def test_lineage_of_the_best_goes_back_to_the_seeds(client):
    page = client.get("/runs/preference/lineage")
    assert page.status_code == 200 and f'/runs/preference/candidates/{HOSTILE_ID}"' in page.text
    tree = get_json(client, "/api/runs/preference/lineage")
    assert tree["root"] == HOSTILE_ID
    ids = {node["id"] for node in tree["nodes"]}
    assert {HOSTILE_ID, 7, 4, 3, 0} <= ids  # hostile <- sharp <- tempered <- smooth_dpo <- dpo


def test_loss_shape_beside_dpo_for_preference_losses(client):
    shape = get_json(client, "/api/runs/preference/candidates/7/shape")
    assert shape["applicable"] and shape["beta"] == pytest.approx(0.05)
    roles = {curve["role"]: curve for curve in shape["curves"]}
    assert set(roles) == {"candidate", "parent", "dpo"}
    z = shape["z"]
    zero = z.index(0.0)
    # DPO is -log(sigmoid(z)): log 2 at 0 with slope -1/2; "sharp" doubles beta: slope -1 there.
    assert roles["dpo"]["values"][zero] == pytest.approx(0.693147, abs=1e-5)
    assert roles["dpo"]["gradient"][zero] == pytest.approx(-0.5, abs=1e-4)
    assert roles["candidate"]["gradient"][zero] == pytest.approx(-1.0, abs=1e-4)


def test_loss_shape_says_why_it_is_not_drawn_for_other_losses(client):
    shape = get_json(client, "/api/runs/regression/candidates/1/shape")
    assert not shape["applicable"] and "preference" in shape["reason"]


# -- safety ---------------------------------------------------------------------------------------
def test_hostile_text_is_escaped_everywhere_on_the_candidate_page(client):
    page = client.get(f"/runs/preference/candidates/{HOSTILE_ID}")
    assert page.status_code == 200
    assert "<script>window.__pwned" not in page.text and "<img src" not in page.text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page.text
    assert page.text.count("&lt;script&gt;") >= 4  # name, thought, code comment, prompt and reply
    failing = client.get(f"/runs/preference/candidates/{FAILED_HOSTILE_ID}")
    assert "<script>" not in failing.text and "&lt;script&gt;" in failing.text
    report = get_json(client, f"/api/runs/preference/candidates/{HOSTILE_ID}")
    assert report["name"] == HOSTILE and report["llm_calls"][0]["reply"] == HOSTILE  # JSON keeps the text as is


def test_only_reads_no_endpoint_changes_anything(client, dashboard_runs):
    before = (dashboard_runs / "regression" / "run.sqlite").read_bytes()
    for url in ("/", "/api/runs", "/runs/regression", "/api/runs/regression/candidates/1"):
        assert client.post(url).status_code == 405
        assert client.delete(url).status_code == 405
    assert (dashboard_runs / "regression" / "run.sqlite").read_bytes() == before


def test_other_host_headers_are_refused_when_bound_to_loopback(dashboard_runs):
    with TestClient(create_app(dashboard_runs, allowed_hosts=["127.0.0.1", "localhost"]),
                    base_url="http://127.0.0.1:8765") as guarded:
        assert guarded.get("/api/runs").status_code == 200
        assert guarded.get("/api/runs", headers={"host": "attacker.example"}).status_code == 400


# -- errors ---------------------------------------------------------------------------------------
def test_damaged_store_gives_a_readable_error_page(tmp_path):
    run_dir = build_run(tmp_path / "runs" / "damaged")
    build_run(tmp_path / "runs" / "fine")
    store = run_dir / "run.sqlite"
    data = bytearray(store.read_bytes())
    data[100:] = b"\x00garbage" * ((len(data) - 100) // 8) + b"\x00" * ((len(data) - 100) % 8)
    store.write_bytes(bytes(data))
    with TestClient(create_app(tmp_path / "runs")) as test_client:
        page = test_client.get("/runs/damaged")
        assert page.status_code == 500
        assert "This run cannot be read" in page.text and "damaged" in page.text
        assert "Traceback" not in page.text and 'href="/"' in page.text
        api = test_client.get("/api/runs/damaged")
        assert api.status_code == 500 and api.json()["error"] == "This run cannot be read"
        runs = {run["key"]: run for run in get_json(test_client, "/api/runs")["runs"]}
        assert runs["damaged"]["status"] == "unreadable" and runs["damaged"]["error"]
        assert runs["fine"]["status"] == "finished"


def test_unknown_run_candidate_and_cursor_are_clear_errors(client):
    page = client.get("/runs/nowhere")
    assert page.status_code == 404 and "No such run" in page.text
    assert client.get("/runs/regression/candidates/999").status_code == 404
    assert "no candidate 999" in client.get("/api/runs/regression/candidates/999").json()["detail"]
    assert client.get("/api/runs/regression/events?after=x").status_code == 400
    assert client.get("/runs/..%2F..%2Fetc").status_code == 404


def test_single_run_folder_is_served_by_its_name(dashboard_runs):
    with TestClient(create_app(dashboard_runs / "regression")) as single:
        assert [run["key"] for run in get_json(single, "/api/runs")["runs"]] == ["regression"]


def test_plotly_js_is_served_from_the_installed_package(client):
    import plotly

    response = client.get("/static/plotly.min.js")
    shipped = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    with open(shipped, "rb") as file:
        assert response.status_code == 200 and response.content == file.read()
    assert client.get("/static/dashboard.js").status_code == 200
    assert ".highlight" in client.get("/static/pygments.css").text


# -- the command ----------------------------------------------------------------------------------
def test_serve_without_the_extra_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    from engine.cli import main

    monkeypatch.setitem(sys.modules, "starlette", None)
    assert main(["serve", str(tmp_path)]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


def test_serve_rejects_a_missing_folder(tmp_path, capsys):
    from engine.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_defaults_to_this_machine_only():
    from engine.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.runs, args.open) == ("127.0.0.1", 8765, "runs", False)


def test_other_commands_do_not_import_the_web_stack():
    code = ("import sys, engine.cli; engine.cli.build_parser().parse_args(['run']); "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'plotly', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_command_answers_over_http(dashboard_runs, tmp_path):
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", str(dashboard_runs), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_events_wait_for_news_and_answer_as_it_arrives(tmp_path):
    import threading

    run_dir = build_run(tmp_path / "runs" / "waiting")
    with TestClient(create_app(tmp_path / "runs", min_interval=0.0)) as test_client:
        first = get_json(test_client, "/api/runs/waiting/events?after=-1")
        query = f"after={first['cursor']}&version={first['version']}"
        start = time.perf_counter()
        quiet = get_json(test_client, f"/api/runs/waiting/events?{query}&wait=0.6")
        assert quiet["evaluations"] == [] and 0.5 <= time.perf_counter() - start < 5

        def write_later() -> None:
            time.sleep(0.5)
            writer = RunStore.open(run_dir)
            writer.add_candidates([Candidate(10, "later", "def later(a):\n    return a\n", "", (), "llm:propose", 3, "l")])
            writer.add_evaluation(EvalResult(10, "invalid", error="no"), "synthetic-pref")
            writer.close()

        threading.Thread(target=write_later).start()
        start = time.perf_counter()
        news = get_json(test_client, f"/api/runs/waiting/events?{query}&wait=20")
        assert [row["name"] for row in news["evaluations"]] == ["later"] and time.perf_counter() - start < 5
        assert test_client.get("/api/runs/waiting/events?wait=soon").status_code == 400
