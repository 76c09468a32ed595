"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium): clicking through a run, following a run in progress, hostile text staying
inert, a damaged store. With ``EVOLOSS_SCREENSHOTS=1`` it also saves the README's screenshots
under ``docs/``."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the dashboard needs the serve extra: pip install -e '.[serve]'")
selenium = pytest.importorskip("selenium", reason="browser tests need selenium (in the dev extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from archives.store import RunStore  # noqa: E402
from engine.candidate import Candidate, EvalResult  # noqa: E402
from tests.archives.conftest import HOSTILE, HOSTILE_ID  # noqa: E402
from tests.fixtures.runs import build_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: Chromium as root in a container: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """The dashboard app under uvicorn in a thread, on a free local port."""

    def __init__(self, root: Path) -> None:
        import uvicorn

        from archives.dashboard.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(root, allowed_hosts=["127.0.0.1", "localhost"], min_interval=0.1),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chromium(profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


@pytest.fixture(scope="module")
def runs_root(dashboard_runs, tmp_path_factory) -> Path:
    """The shared runs, a run still going (generations 3 to 5 to come) and a damaged store."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    shutil.copytree(dashboard_runs, root)
    live = build_run(root / "live")
    store = RunStore.open(live)
    store.set_meta("config", {**store.meta("config"), "gens": 5})
    store.close()
    damaged = build_run(root / "damaged") / "run.sqlite"
    damaged.write_bytes(damaged.read_bytes()[:100] + b"\x00" * (damaged.stat().st_size - 100))
    return root


@pytest.fixture(scope="module")
def server(runs_root):
    with Server(runs_root) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 20.0, poll: float = 0.05):
    return WebDriverWait(driver, timeout, poll_frequency=poll).until(lambda d: condition(d))


def plotted(driver, plot_id: str) -> bool:
    return bool(driver.execute_script(
        "const p = document.getElementById(arguments[0]); return !!(p && p._fullLayout && p.querySelector('.main-svg'))",
        plot_id))


def assert_inert(driver) -> None:
    """No hostile script ran: no marker set, no alert open."""
    assert driver.execute_script("return window.__pwned === undefined")
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when there is none


def click_plot_point(driver, plot_id: str, x: float, y: float) -> None:
    """Click the plot where data point (x, y) is drawn, as a person would."""
    dx, dy = driver.execute_script("""
        const plot = document.getElementById(arguments[0]);
        const layout = plot._fullLayout, box = plot.getBoundingClientRect();
        const px = layout._size.l + layout.xaxis.l2p(arguments[1]), py = layout._size.t + layout.yaxis.l2p(arguments[2]);
        return [px - box.width / 2, py - box.height / 2];
    """, plot_id, x, y)
    element = driver.find_element(By.ID, plot_id)
    ActionChains(driver).move_to_element_with_offset(element, int(dx), int(dy)).pause(0.3).click().perform()


# -- clicking through a real run ------------------------------------------------------------------
def test_run_page_heat_map_cell_to_candidate_to_parent(server, browser, dashboard_runs):
    store = RunStore.open(dashboard_runs / "regression", readonly=True)
    candidates = {c.id: c for c in store.candidates()}
    evaluations = sum(1 for _, result in store.evaluations() if result.status != "duplicate")
    store.close()
    browser.get(f"{server.url}/runs/regression")
    wait(browser, lambda d: plotted(d, "archive-plot") and plotted(d, "fitness-plot"))
    assert browser.find_element(By.ID, "stat-evaluations").text == str(evaluations)
    assert browser.find_element(By.ID, "run-status").text == "finished"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#operators-body tr")) >= 2
    cells = browser.execute_script("return JSON.parse(document.getElementById('archive-plot').dataset.cells)")
    cell = next(c for c in cells if candidates[c["id"]].parents)
    click_plot_point(browser, "archive-plot", cell["x"], cell["y"])
    wait(browser, lambda d: d.current_url.endswith(f"/runs/regression/candidates/{cell['id']}"))
    candidate = candidates[cell["id"]]
    assert browser.find_element(By.ID, "candidate-name").text == candidate.name
    assert candidate.name in browser.find_element(By.ID, "code").text
    wait(browser, lambda d: plotted(d, "tree-plot"))
    note = browser.find_element(By.ID, "shape-note")
    wait(browser, lambda d: "preference" in note.text, timeout=90)  # the regression loss has no f(beta*rho)
    parent = candidate.parents[0]
    browser.find_element(By.CSS_SELECTOR, f'a.parent-link[href$="/candidates/{parent}"]').click()
    wait(browser, lambda d: d.current_url.endswith(f"/runs/regression/candidates/{parent}"))
    assert browser.find_element(By.ID, "candidate-name").text == candidates[parent].name
    children = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.child-link")]
    assert f"{candidate.id} {candidate.name}" in children


def test_runs_page_lists_runs_and_compares_two(server, browser):
    browser.get(server.url + "/")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-key]")) == 4)
    statuses = {row.get_attribute("data-key"): row.find_element(By.CSS_SELECTOR, ".status").text
                for row in browser.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-key]")}
    assert statuses == {"damaged": "unreadable", "live": "running", "preference": "finished",
                        "regression": "finished"}
    for key in ("regression", "preference"):
        browser.find_element(By.CSS_SELECTOR, f'input[data-key="{key}"]').click()
    wait(browser, lambda d: plotted(d, "compare-plot") and d.execute_script(
        "return document.getElementById('compare-plot').data.length") == 2)
    assert browser.find_element(By.ID, "compare-note").text == "2 runs"


def test_loss_shape_is_drawn_beside_dpo(server, browser):
    browser.get(f"{server.url}/runs/preference/candidates/7")
    wait(browser, lambda d: plotted(d, "shape-plot") and plotted(d, "gradient-plot"), timeout=90)
    names = browser.execute_script("return document.getElementById('shape-plot').data.map(t => t.name)")
    assert names == ["7 sharp", "4 tempered", "dpo"]


def test_lineage_of_the_best_page_draws_the_tree(server, browser):
    browser.get(f"{server.url}/runs/preference/lineage")
    wait(browser, lambda d: plotted(d, "tree-plot"))
    nodes = browser.execute_script("return JSON.parse(document.getElementById('tree-plot').dataset.nodes)")
    assert {HOSTILE_ID, 7, 4, 3, 0} <= {node["id"] for node in nodes}
    assert_inert(browser)


# -- safety ---------------------------------------------------------------------------------------
def test_hostile_name_thought_and_reply_render_as_text(server, browser):
    browser.get(f"{server.url}/runs/preference/candidates/{HOSTILE_ID}")
    wait(browser, lambda d: plotted(d, "tree-plot"))
    assert browser.find_element(By.ID, "candidate-name").text == HOSTILE
    assert browser.find_element(By.ID, "thought").text == HOSTILE
    assert HOSTILE in browser.find_element(By.ID, "code").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []  # the <img onerror> never became an element
    reply = browser.find_element(By.CSS_SELECTOR, "pre.reply")
    assert reply.text == HOSTILE
    assert_inert(browser)
    for url in ("/", "/runs/preference"):
        browser.get(server.url + url)
        wait(browser, lambda d: HOSTILE in d.find_element(By.TAG_NAME, "main").text)
        time.sleep(0.5)  # let the charts draw the names too
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        assert_inert(browser)


def test_damaged_store_shows_a_readable_error_page(server, browser):
    browser.get(f"{server.url}/runs/damaged")
    assert browser.find_element(By.ID, "error-title").text == "This run cannot be read"
    message = browser.find_element(By.ID, "error-message").text
    assert "run.sqlite" in message and "Traceback" not in browser.page_source


# -- live -----------------------------------------------------------------------------------------
def test_a_run_in_progress_updates_the_open_page(server, browser, runs_root):
    browser.get(f"{server.url}/runs/live")
    wait(browser, lambda d: plotted(d, "fitness-plot") and d.find_elements(By.CSS_SELECTOR, "#feed-body tr[data-eval]"))
    assert browser.find_element(By.ID, "run-status").text == "running"
    assert browser.find_element(By.ID, "stat-evaluations").text == "10"
    latencies = []
    writer = RunStore.open(runs_root / "live")
    try:
        for cid, fitness in ((10, 0.91), (11, 0.95)):
            writer.add_candidates([Candidate(cid, f"arrived_{cid}", f"def arrived_{cid}(a):\n    return a\n", "",
                                             (7,), "llm:mutate", 3, f"h{cid}")])
            writer.add_evaluation(EvalResult(cid, "ok", fitness, {}, {"slope_at_zero": 0.0, "left_tail_growth": 0.0}),
                                  "synthetic-pref")
            committed = time.perf_counter()
            # The wait ends within this iteration, so the lambda sees this cid.
            wait(browser, lambda d: d.find_elements(By.XPATH, f"//tbody[@id='feed-body']//a[text()='arrived_{cid}']"),  # noqa: B023
                 timeout=10, poll=0.02)
            latencies.append(time.perf_counter() - committed)
    finally:
        writer.close()
    print(f"live update latency: {', '.join(f'{s:.2f} s' for s in latencies)}", file=sys.stderr)
    assert max(latencies) <= 2.0
    wait(browser, lambda d: d.find_element(By.ID, "stat-evaluations").text == "12", timeout=5)
    assert browser.find_element(By.ID, "stat-best-name").text == "arrived_11"


# -- screenshots for the README -------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("EVOLOSS_SCREENSHOTS") != "1", reason="set EVOLOSS_SCREENSHOTS=1 to save docs/ screenshots")
def test_save_screenshots(tmp_path, dashboard_runs):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from replay_speed import build

    root = tmp_path / "runs"
    shutil.copytree(dashboard_runs / "regression", root / "robust-regression-example")
    build(root / "synthetic-pref-llm", 2000, per_generation=50, seed=3)
    build(root / "synthetic-pref-llm-2", 1500, per_generation=50, seed=4)
    # The builder's seed named dpo holds a random genome: give it DPO's code for the loss-shape plot.
    import sqlite3

    from fitness.preference import PREFERENCE_SEEDS

    dpo = next(seed.code for seed in PREFERENCE_SEEDS if seed.name == "dpo")
    with sqlite3.connect(root / "synthetic-pref-llm" / "run.sqlite") as db:
        db.execute("UPDATE candidates SET code = ? WHERE name = 'dpo'", (dpo,))
    driver = chromium(tmp_path / "profile")
    driver.set_window_size(1400, 1000)
    try:
        with Server(root) as running:
            driver.get(running.url + "/")
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-key]")) == 3)
            for key in ("synthetic-pref-llm", "synthetic-pref-llm-2"):
                driver.find_element(By.CSS_SELECTOR, f'input[data-key="{key}"]').click()
            wait(driver, lambda d: plotted(d, "compare-plot"))
            time.sleep(0.5)
            driver.save_screenshot(str(ROOT / "docs" / "dashboard-runs.png"))
            driver.get(running.url + "/runs/synthetic-pref-llm")
            wait(driver, lambda d: plotted(d, "archive-plot") and plotted(d, "llm-plot"))
            time.sleep(0.5)
            driver.set_window_size(1400, 1500)
            driver.save_screenshot(str(ROOT / "docs" / "dashboard-run.png"))
            best = driver.execute_script("return fetch('/api/runs/synthetic-pref-llm').then(r => r.json())"
                                         ".then(v => v.summary.top.find(t => t.parents.length).id)")
            driver.set_window_size(1400, 1300)
            driver.get(f"{running.url}/runs/synthetic-pref-llm/candidates/{best}")
            wait(driver, lambda d: plotted(d, "shape-plot") and plotted(d, "tree-plot"), timeout=90)
            time.sleep(0.5)
            driver.save_screenshot(str(ROOT / "docs" / "dashboard-candidate.png"))
    finally:
        driver.quit()
    for name in ("runs", "run", "candidate"):
        assert (ROOT / "docs" / f"dashboard-{name}.png").stat().st_size > 10_000
