"""The loss shape ``f(beta * rho)`` and its gradient (DiscoPOP, Lu et al. 2024, figure 6), for
the dashboard's candidate page and ``replay --plots`` (:func:`loss_shape`: the genome is built by
:func:`engine.genome.compile_genome`, the static check, and called on a grid).

Neither the dashboard nor ``replay`` calls genome code in its own process: :func:`loss_shapes`
runs this module as a child process (``python -m archives.shapes``, a JSON request on
stdin, a JSON answer on stdout) with a time limit and an address-space limit, so a genome that
loops or eats memory costs one child, not the server. The child runs in the same OS jail as an
evaluation worker (:mod:`engine.jail`, ``auto``: it sees neither your home folder, nor the
working folder, nor any run folder, and has no network): a stored genome is untrusted code
whoever shows it, and the fitness plug-in named in a run's settings (a ``path.py:Class`` of a
run folder someone shared) is imported there too, where a file outside the project is not
found (the curves then judge the losses by their parameter names).
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
#: The child's address-space limit, bytes.
MEMORY_LIMIT = 4 << 30


def loss_shapes(config: dict[str, Any], fitness_name: str | None, seed_code: str | None,
                curves: list[dict[str, str]], time_limit: float = TIME_LIMIT,
                z_range: tuple[float, float] = Z_RANGE, points: int = Z_POINTS,
                sandbox: str = "auto") -> dict[str, Any]:
    """Curves for ``curves`` (dicts with ``label``, ``code`` and ``role``) on ``points`` values of
    ``beta * rho`` over ``z_range``, computed in a jailed child (``sandbox``: see
    :func:`engine.jail.choose`).

    Returns:
        ``{"applicable": bool, "reason": str | None, "beta": float, "z": [...], "curves": [{label,
        role, values, gradient} | {label, role, error}], "notes": [...], "sandbox": str}``.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from engine import jail
    from engine.executor import scrubbed_environment

    request = {"config": config, "fitness_name": fitness_name, "seed_code": seed_code, "curves": curves,
               "z_range": list(z_range), "points": int(points)}
    try:
        chosen = jail.choose(sandbox)
    except jail.SandboxUnavailable as exc:
        return {"applicable": False, "reason": f"no sandbox to draw the loss shapes in: {exc}", "curves": []}
    scratch = Path(tempfile.mkdtemp(prefix="evoloss-shapes-"))
    limits = jail.Limits(address_space=MEMORY_LIMIT)
    try:
        view = jail.View(scratch=scratch, **jail.guessed_view_parts([]))
        env = jail.jail_environment(scrubbed_environment(), view, chosen)
        argv, launcher_env = jail.wrap(chosen, [sys.executable, "-m", "archives.shapes"], view, env, limits)
        done = subprocess.run(argv, input=json.dumps(request), capture_output=True, text=True, timeout=time_limit,
                              env=launcher_env, cwd=view.workdir, start_new_session=True,
                              preexec_fn=jail.preexec(limits))  # noqa: PLW1509 - only without prlimit
    except subprocess.TimeoutExpired:
        return {"applicable": False, "reason": f"the loss shapes took longer than {time_limit:g} s", "curves": []}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no message"]
        return {"applicable": False, "reason": f"the loss-shape process failed ({tail[0][:300]})", "curves": []}
    answer = json.loads(done.stdout)
    answer["sandbox"] = chosen.kind
    if not chosen.jailed:
        answer.setdefault("notes", []).append(f"loss shapes drawn without an OS jail ({chosen.describe()})")
    return answer


def compute(request: dict[str, Any]) -> dict[str, Any]:
    """What the child does: the interface from the run's settings, then each curve."""
    import numpy as np

    notes: list[str] = []
    interface = preference_interface_of(request["config"], request["fitness_name"], request["seed_code"], notes)
    if interface is None:
        return {"applicable": False, "notes": notes, "curves": [],
                "reason": f"the fitness plug-in {request['fitness_name']!r} does not score preference losses, "
                          "so there is no f(beta*rho) to draw"}
    low, high = request.get("z_range") or Z_RANGE
    z = np.linspace(float(low), float(high), int(request.get("points") or Z_POINTS))
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


def preference_interface_of(config: dict[str, Any], fitness_name: str | None, seed_code: str | None,
                            notes: list[str] | None = None):
    """The preference interface of a run with these settings (``seed_code``: its first seed's
    code, to judge by parameter names when the plug-in cannot be loaded), or None."""
    from fitness.preference import TENSOR_NAMES, PreferenceInterface

    try:
        from engine.ladder import parse_fitness, split_options
        from engine.plugins import load_fitness

        # A ladder's first stage: every stage takes the same loss.
        first = split_options(parse_fitness(config.get("fitness") or fitness_name),
                              config.get("fitness_options") or {})[0]
        interface = load_fitness(first.spec, first.options).interface
        return interface if isinstance(interface, PreferenceInterface) else None
    except Exception as exc:  # noqa: BLE001 - fall back on the genomes' parameter names
        if notes is not None:
            notes.append(f"loss_shape: fitness plug-in not loadable ({type(exc).__name__}: {exc}); "
                         "judging the losses by their parameter names")
    if seed_code is None or not all(name in seed_code for name in TENSOR_NAMES):
        return None
    beta = (config.get("fitness_options") or {}).get("beta", 0.05)
    return PreferenceInterface(beta=beta)


def loss_shape(interface, code: str, z) -> tuple[Any, Any]:
    """``f(z)`` and ``df/dz`` of a preference loss on ``z = beta * rho`` (numpy arrays).

    Raises:
        ValueError: The genome fails the static check, raises, or gives non-finite values.
    """
    import torch

    from engine.genome import compile_genome

    fn = compile_genome(code, interface.arg_counts)
    rho = torch.as_tensor(z, dtype=torch.float64) / interface.beta
    policy_chosen = rho.clone().requires_grad_(True)
    zeros = torch.zeros_like(rho)
    inputs = {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": zeros.clone().requires_grad_(True),
              "reference_chosen_logps": zeros.clone(), "reference_rejected_logps": zeros.clone()}
    losses = interface.call(fn, inputs)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != tuple(rho.shape):
        raise ValueError("the loss did not return one value per example")
    losses.sum().backward()
    import numpy as np

    values = losses.detach().double().numpy()
    grad = policy_chosen.grad if policy_chosen.grad is not None else zeros
    # d f / d z = d f / d rho * d rho / d z, with rho = z / beta
    slope = (grad.detach().double() / interface.beta).numpy()
    if not (np.isfinite(values).all() and np.isfinite(slope).all()):
        raise ValueError("non-finite loss or gradient on the grid")
    return values, slope


def main() -> None:
    import torch

    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    json.dump(compute(request), sys.stdout)


if __name__ == "__main__":
    main()
