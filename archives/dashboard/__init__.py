"""A live web dashboard over run stores: ``python -m engine serve [RUN | RUNS_DIR]``.

Pages: the runs in a folder (compare their fitness curves), one run (fitness over the run, the
MAP-Elites archive as a heat map, operators and the chooser's probabilities, failures, LLM
cost, fidelity stages, re-evaluations), one candidate (code, diffs against its parents, thought,
lineage, the loss shape beside DPO's, evaluations, the LLM prompt and reply) and the lineage of
the best loss. A run in progress in another process is followed as it grows.

The web layer is thin: runs are read by :mod:`archives.reading` and summarised by
:mod:`archives.replay`; :mod:`archives.dashboard.library` keeps them up to date,
:mod:`archives.dashboard.views` arranges them for the pages and :mod:`archives.dashboard.app`
serves them (Starlette, Jinja2, Plotly's own plotly.js; nothing from the network). It needs the
``serve`` extra: ``pip install -e '.[serve]'``.
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

#: The packages of the ``serve`` extra, by import name.
WEB_STACK = ("starlette", "uvicorn", "jinja2", "plotly", "pygments")
EXTRA_HINT = "pip install -e '.[serve]'"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def require_web_stack() -> None:
    """Raise ImportError naming the ``serve`` extra when a package of it is missing."""
    import importlib

    missing = []
    for name in WEB_STACK:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"the dashboard needs {', '.join(missing)}: install the serve extra with {EXTRA_HINT}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(root: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, open_browser: bool = False) -> None:
    """Serve the dashboard until interrupted (Ctrl-C)."""
    require_web_stack()
    import uvicorn

    from archives.dashboard.app import create_app

    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if is_loopback(host) else None
    app = create_app(root, allowed_hosts=allowed)
    url = f"http://{'localhost' if is_loopback(host) else host}:{port}/"
    print(f"evoloss dashboard for {Path(root).resolve()} at {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    if not is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine can read these runs",
              file=sys.stderr, flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
