"""The dashboard's web layer (Starlette): HTML pages, the JSON they load, static files.

Pages are rendered by Jinja2 with autoescaping, and the browser fills tables in with
``textContent`` only, so genome code, names, thoughts, errors and LLM replies always show as
text. Every response carries a Content-Security-Policy without inline scripts. Only GET
routes exist: nothing here runs a loss or changes a store.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import archives.shapes as shapes
import archives.dashboard.views as views
from archives.dashboard.library import RunLibrary, RunNotFound, Snapshot
from archives.store import StoreError

HERE = Path(__file__).resolve().parent
log = logging.getLogger("evoloss.dashboard")

#: Seconds between two looks at a store while an events request waits for news.
EVENT_CHECK = 0.2
#: Scripts only from this server (no inline script, no CDN); Plotly sets inline styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def plotly_js() -> Path:
    """plotly.js as shipped inside the plotly Python package."""
    return Path(str(files("plotly") / "package_data" / "plotly.min.js"))


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _highlight(code: str, language: str = "python") -> Markup:
    """Code as HTML with Pygments (which escapes it)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import DiffLexer, PythonLexer

    lexer = DiffLexer() if language == "diff" else PythonLexer()
    return Markup(highlight(code or "", lexer, HtmlFormatter(cssclass="highlight")))


class Dashboard:
    """The routes over one :class:`RunLibrary`."""

    def __init__(self, library: RunLibrary) -> None:
        self.library = library
        self.templates = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters["num"] = _number
        self.templates.filters["highlight"] = _highlight
        self.templates.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
        self._shapes: dict[tuple[str, int], dict[str, Any]] = {}
        self._pygments_css: str | None = None

    # -- helpers --------------------------------------------------------------------------
    def render(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status_code)

    def snapshot(self, request: Request) -> tuple[Any, Snapshot]:
        run = self.library.get(request.path_params["key"])
        return run, run.refresh()

    @staticmethod
    def candidate_id(request: Request, snapshot: Snapshot) -> int:
        cid = request.path_params["cid"]
        if cid not in snapshot.data.candidates:
            raise HTTPException(404, f"this run has no candidate {cid}")
        return cid

    # -- pages ----------------------------------------------------------------------------
    async def runs_page(self, request: Request) -> Response:
        return self.render("runs.html", root=str(self.library.root), page="runs", title="Runs")

    def run_page(self, request: Request) -> Response:
        # A shell: the numbers come with the page's first JSON request, so a run that just grew
        # is not summarised twice.
        run, snapshot = self.snapshot(request)
        with run.lock:
            return self.render("run.html", page="run", key=run.key, path=str(run.path), title=run.key,
                               fitness=snapshot.data.fitness_name, status=snapshot.status,
                               operators=views.operators_of(snapshot.data.config))

    def candidate_page(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        with run.lock:
            cid = self.candidate_id(request, snapshot)
            report = views.candidate_view(snapshot, cid)
        return self.render("candidate.html", page="candidate", key=run.key, title=f"{cid} {report['name']}",
                           c=report, status=snapshot.status)

    def lineage_page(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        with run.lock:
            best = views.best_with_ancestors(snapshot)
            name = snapshot.data.candidates[best].name if best is not None else None
        return self.render("lineage.html", page="lineage", key=run.key, title=f"lineage of the best - {run.key}",
                           best=best, best_name=name, status=snapshot.status)

    # -- JSON -----------------------------------------------------------------------------
    def api_runs(self, request: Request) -> Response:
        return JSONResponse({"root": str(self.library.root),
                             "runs": [views.run_overview(run) for run in self.library.runs()]})

    def api_run(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        return Response(self.run_json(run, snapshot), media_type="application/json")

    @staticmethod
    def run_json(run, snapshot: Snapshot) -> bytes:
        # Serialised once per version: a large run's view is most of a megabyte of JSON.
        return run.view("run", snapshot.version, lambda: JSONResponse(views.run_view(snapshot, run.key)).body)

    def warm(self) -> None:
        """Read every run and make its run-page JSON (in the background as the server starts),
        so that the first visit to a large run is served from memory."""
        for run in self.library.runs():
            try:
                self.run_json(run, run.refresh())
            except StoreError:
                pass  # shown as unreadable when asked for

    def api_history(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        return JSONResponse({"key": run.key, **run.view("history", snapshot.version, lambda: views.history(snapshot))})

    async def api_events(self, request: Request) -> Response:
        """Evaluations stored after row ``after`` (the page's cursor) and the run's version. With
        ``wait=S`` the answer waits up to S seconds (at most 30) for news: a new evaluation, or a
        version other than ``version``; the store is looked at every :data:`EVENT_CHECK` seconds,
        reading only rows beyond what is held."""
        try:
            after = int(request.query_params.get("after", "-1"))
            wait = min(max(float(request.query_params.get("wait", "0")), 0.0), 30.0)
            known = int(request.query_params.get("version", "-1"))
        except ValueError as exc:
            raise HTTPException(400, "after and version must be integers, wait a number of seconds") from exc
        run = self.library.get(request.path_params["key"])
        deadline = time.monotonic() + wait
        while True:
            snapshot = await run_in_threadpool(run.refresh)
            rows = run.feed(after)
            if rows or snapshot.version != known or time.monotonic() >= deadline or await request.is_disconnected():
                break
            await asyncio.sleep(EVENT_CHECK)
        return JSONResponse({"cursor": max([after, *(row["eval_id"] for row in rows)]), "version": snapshot.version,
                             "status": snapshot.status, "evaluations": rows})

    def api_candidate(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        with run.lock:
            cid = self.candidate_id(request, snapshot)
            return JSONResponse(views.candidate_view(snapshot, cid))

    def api_tree(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        with run.lock:
            cid = self.candidate_id(request, snapshot)
            children = run.view("children", snapshot.version, lambda: views.children_of(snapshot.data))
            return JSONResponse(views.tree(snapshot.data, children, cid))

    def api_lineage(self, request: Request) -> Response:
        run, snapshot = self.snapshot(request)
        with run.lock:
            best = views.best_with_ancestors(snapshot)
            if best is None:
                return JSONResponse({"root": None, "nodes": [], "edges": [], "truncated": False})
            return JSONResponse(run.view("lineage", snapshot.version,
                                         lambda: views.tree(snapshot.data, {}, best, descendants=False)))

    def api_shape(self, request: Request) -> Response:
        """f(beta*rho) and its gradient for the candidate, its parents and DPO (computed once)."""
        run, snapshot = self.snapshot(request)
        with run.lock:
            cid = self.candidate_id(request, snapshot)
            data = snapshot.data
            seeds = [c for c in data.candidates.values() if c.operator == "seed"]
            candidate = data.candidates[cid]
            parents = [data.candidates[p] for p in candidate.parents if p in data.candidates]
            config, fitness_name = data.config, data.fitness_name
        key = (run.key, cid)
        if key not in self._shapes:
            from archives.plots import dpo_reference

            dpo = dpo_reference(next((c.code for c in seeds if c.name == "dpo"), None))
            curves = [{"label": f"{cid} {candidate.name}", "code": candidate.code, "role": "candidate"}]
            curves += [{"label": f"{p.id} {p.name}", "code": p.code, "role": "parent"} for p in parents]
            if dpo and dpo != candidate.code:
                curves.append({"label": "dpo", "code": dpo, "role": "dpo"})
            self._shapes[key] = shapes.loss_shapes(config, fitness_name, seeds[0].code if seeds else None, curves)
        return JSONResponse(self._shapes[key])

    # -- static ---------------------------------------------------------------------------
    async def plotly(self, request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    async def pygments_css(self, request: Request) -> Response:
        if self._pygments_css is None:
            from pygments.formatters import HtmlFormatter

            self._pygments_css = HtmlFormatter(style="default").get_style_defs(".highlight")
        return Response(self._pygments_css, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})

    # -- errors ---------------------------------------------------------------------------
    def error(self, request: Request, status_code: int, title: str, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": title, "detail": message}, status_code=status_code)
        return self.render("error.html", status_code=status_code, page="error", title=title, message=message,
                           key=request.path_params.get("key"))

    async def on_http(self, request: Request, exc: HTTPException) -> Response:
        titles = {404: "Not found", 405: "Read-only", 400: "Bad request"}
        return self.error(request, exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail))

    async def on_not_found(self, request: Request, exc: RunNotFound) -> Response:
        return self.error(request, 404, "No such run", str(exc))

    async def on_store_error(self, request: Request, exc: StoreError) -> Response:
        return self.error(request, 500, "This run cannot be read", str(exc))

    async def on_error(self, request: Request, exc: Exception) -> Response:
        log.exception("dashboard error on %s", request.url.path)
        return self.error(request, 500, "The dashboard failed on this page", f"{type(exc).__name__}: {exc}")


async def _security_headers(request: Request, call_next) -> Response:
    response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response


def create_app(root: str | Path, allowed_hosts: list[str] | None = None, min_interval: float = 0.25,
               idle_seconds: float | None = None, warm: bool = True) -> Starlette:
    """The dashboard app over the run folder or folder of runs ``root``.

    Args:
        root: A run folder (holding ``run.sqlite``) or a folder with run folders below it.
        allowed_hosts: Host headers accepted (DNS-rebinding guard); None accepts any.
        min_interval: Seconds between two looks at a store for news.
        idle_seconds: A run not written for this long, and not done, shows as interrupted.
        warm: Read every run in the background when the server starts.
    """
    from starlette.middleware.base import BaseHTTPMiddleware

    kwargs = {} if idle_seconds is None else {"idle_seconds": idle_seconds}
    dashboard = Dashboard(RunLibrary(root, min_interval=min_interval, **kwargs))
    run = "/runs/{key}"
    api = "/api/runs/{key}"
    routes = [
        Route("/", dashboard.runs_page),
        Route(run, dashboard.run_page),
        Route(run + "/candidates/{cid:int}", dashboard.candidate_page),
        Route(run + "/lineage", dashboard.lineage_page),
        Route("/api/runs", dashboard.api_runs),
        Route(api, dashboard.api_run),
        Route(api + "/history", dashboard.api_history),
        Route(api + "/events", dashboard.api_events),
        Route(api + "/lineage", dashboard.api_lineage),
        Route(api + "/candidates/{cid:int}", dashboard.api_candidate),
        Route(api + "/candidates/{cid:int}/tree", dashboard.api_tree),
        Route(api + "/candidates/{cid:int}/shape", dashboard.api_shape),
        Route("/static/plotly.min.js", dashboard.plotly),
        Route("/static/pygments.css", dashboard.pygments_css),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=_security_headers)]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Read the runs in the background so the first page of a large run comes from memory.
        threading.Thread(target=dashboard.warm, name="dashboard-warm", daemon=True).start()
        yield

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan if warm else None, exception_handlers={
        HTTPException: dashboard.on_http, RunNotFound: dashboard.on_not_found, StoreError: dashboard.on_store_error,
        Exception: dashboard.on_error,
    })
    app.state.dashboard = dashboard
    return app
