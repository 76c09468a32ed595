"""The loss shape ``f(beta * rho)`` and its gradient for the candidate page (DiscoPOP, Lu et al.
2024, figure 6), through the same code path as ``replay --plots`` (:func:`archives.plots.loss_shape`:
the genome is built by :func:`engine.genome.compile_genome`, the static check, and called on a
grid).

The dashboard never calls genome code in its own process: :func:`loss_shapes` runs this module
as a child process (``python -m archives.dashboard.shapes``, a JSON request on stdin, a JSON
answer on stdout) with a time limit, so a genome that loops or eats memory costs one child,
not the server.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

#: The grid of ``beta * rho`` values the curves are drawn on.
Z_RANGE = (-10.0, 10.0)
Z_POINTS = 201
#: Seconds a child may take (importing torch is most of it).
TIME_LIMIT = 60.0


def loss_shapes(config: dict[str, Any], fitness_name: str | None, seed_code: str | None,
                curves: list[dict[str, str]], time_limit: float = TIME_LIMIT) -> dict[str, Any]:
    """Curves for ``curves`` (dicts with ``label``, ``code`` and ``role``), computed in a child.

    Returns:
        ``{"applicable": bool, "reason": str | None, "beta": float, "z": [...], "curves": [{label,
        role, values, gradient} | {label, role, error}], "notes": [...]}``.
    """
    request = {"config": config, "fitness_name": fitness_name, "seed_code": seed_code, "curves": curves}
    try:
        done = subprocess.run([sys.executable, "-m", "archives.dashboard.shapes"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=time_limit,
                              env=_child_environment())
    except subprocess.TimeoutExpired:
        return {"applicable": False, "reason": f"the loss shapes took longer than {time_limit:g} s", "curves": []}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
        return {"applicable": False, "reason": f"the loss-shape process failed ({tail[0][:300]})", "curves": []}
    return json.loads(done.stdout)


def _child_environment() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def compute(request: dict[str, Any]) -> dict[str, Any]:
    """What the child does: the interface from the run's settings, then each curve."""
    import numpy as np

    from archives.plots import loss_shape, preference_interface_of

    notes: list[str] = []
    interface = preference_interface_of(request["config"], request["fitness_name"], request["seed_code"], notes)
    if interface is None:
        return {"applicable": False, "notes": notes, "curves": [],
                "reason": f"the fitness plug-in {request['fitness_name']!r} does not score preference losses, "
                          "so there is no f(beta*rho) to draw"}
    z = np.linspace(Z_RANGE[0], Z_RANGE[1], Z_POINTS)
    curves = []
    for curve in request["curves"]:
        try:
            values, gradient = loss_shape(interface, curve["code"], z)
            curves.append({"label": curve["label"], "role": curve["role"], "values": values.round(6).tolist(),
                           "gradient": gradient.round(6).tolist()})
        except Exception as exc:  # noqa: BLE001 - a genome may fail outside its training range
            curves.append({"label": curve["label"], "role": curve["role"],
                           "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return {"applicable": True, "reason": None, "beta": interface.beta, "z": z.round(6).tolist(), "curves": curves,
            "notes": notes}


def main() -> None:
    import torch

    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    json.dump(compute(request), sys.stdout)


if __name__ == "__main__":
    main()
