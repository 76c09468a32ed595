"""Figures of a run (matplotlib, Agg backend; PNG files):

* ``fitness.png``: best-so-far, generation max and mean fitness over generations, with the
  seed losses as reference lines (the baseline drawn solid).
* ``archive.png``: the MAP-Elites grid as a heat map over two descriptor axes (the best
  fitness over the remaining axes).
* ``lineage.png``: the ancestry of the best loss, generation by generation.
* ``loss_shape.png``: for preference losses, ``f(beta * rho)`` and its derivative for the
  best losses against DPO, as figure 6 of the DiscoPOP paper (Lu et al. 2024,
  arXiv:2406.08414); ``rho`` is the log-ratio difference, set as the policy's chosen
  log-probability with the other three at zero.

Each plotting function returns the path written or raises :class:`PlotSkipped` with the
reason; :func:`write_plots` collects both.
"""
from __future__ import annotations

import math
from pathlib import Path

PLOT_NAMES = ("fitness", "archive", "lineage", "loss_shape")


class PlotSkipped(Exception):
    """A figure cannot be drawn for this run (the message says why)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'evoloss[analysis]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(run, directory: str | Path, top: int = 5) -> tuple[list[Path], list[str]]:
    """Write every figure of ``run`` (an :class:`archives.analysis.Run`) into ``directory``.

    Returns:
        The files written and a note for each figure that was skipped.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for name, function, kwargs in (
        ("fitness", plot_fitness, {}), ("archive", plot_archive, {}), ("lineage", plot_lineage, {}),
        ("loss_shape", plot_loss_shape, {"top": top, "notes": notes}),
    ):
        try:
            written.append(function(run, directory / f"{name}.png", **kwargs))
        except PlotSkipped as exc:
            notes.append(f"{name}.png skipped: {exc}")
    return written, notes


def _finish(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- fitness over generations ---------------------------------------------------------------
def plot_fitness(run, path: str | Path) -> Path:
    generations = run.generations
    if generations.empty:
        raise PlotSkipped("the run has no finished generation")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    x = generations["generation"].astype(float)
    axis.plot(x, generations["best"].astype(float), "-o", color="C0", label="best so far", zorder=3)
    axis.plot(x, generations["max"].astype(float), "--", color="C1", label="generation max")
    axis.plot(x, generations["mean"].astype(float), ":", color="C2", label="generation mean")
    seeds = run.candidates[(run.candidates["operator"] == "seed") & (run.candidates["status"] == "ok")]
    for _, seed in seeds.iterrows():
        is_baseline = seed["name"] == run.baseline
        axis.axhline(seed["fitness"], color="black" if is_baseline else "grey", lw=1.2 if is_baseline else 0.6,
                     ls="-" if is_baseline else (0, (2, 3)), alpha=0.9 if is_baseline else 0.6, zorder=1)
        axis.annotate(seed["name"], (1.0, seed["fitness"]), xycoords=("axes fraction", "data"), fontsize=7,
                      color="black" if is_baseline else "dimgrey", xytext=(3, 0), textcoords="offset points",
                      va="center", annotation_clip=False)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("generation")
    axis.set_ylabel(f"fitness ({run.fitness_name})")
    axis.set_title("Fitness over generations (lines: seed losses)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    return _finish(plt, figure, Path(path))


# -- the archive ------------------------------------------------------------------------------
def plot_archive(run, path: str | Path, axes: tuple[str, str] | None = None) -> Path:
    """Heat map of the grid over two axes (default: the first two with more than one bin)."""
    import numpy as np

    space = run.space
    if not space:
        raise PlotSkipped("the run saved no descriptor space")
    if run.archive.empty:
        raise PlotSkipped("the archive holds no elite")
    names = [a["name"] for a in space]
    if axes is None:
        wide = [i for i, a in enumerate(space) if int(a["bins"]) > 1] or list(range(len(space)))
        chosen = (wide + [None])[:2]
    else:
        unknown = [a for a in axes if a not in names]
        if unknown:
            raise PlotSkipped(f"unknown descriptor axis {unknown}; the run has {names}")
        chosen = [names.index(a) for a in axes]
    x_axis, y_axis = chosen[0], chosen[1]
    x_bins = int(space[x_axis]["bins"])
    y_bins = int(space[y_axis]["bins"]) if y_axis is not None else 1
    grid = np.full((y_bins, x_bins), np.nan)
    for _, elite in run.archive.iterrows():
        cell = elite["cell"]
        i, j = (cell[y_axis] if y_axis is not None else 0), cell[x_axis]
        if math.isnan(grid[i, j]) or elite["fitness"] > grid[i, j]:
            grid[i, j] = elite["fitness"]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 5))
    x_low, x_high = float(space[x_axis]["low"]), float(space[x_axis]["high"])
    y_low, y_high = (float(space[y_axis]["low"]), float(space[y_axis]["high"])) if y_axis is not None else (0, 1)
    image = axis.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis",
                        extent=(x_low, x_high, y_low, y_high))
    figure.colorbar(image, ax=axis, label=f"best fitness ({run.fitness_name})")
    if x_bins * y_bins <= 120:
        dx, dy = (x_high - x_low) / x_bins, (y_high - y_low) / y_bins
        for i in range(y_bins):
            for j in range(x_bins):
                if not math.isnan(grid[i, j]):
                    axis.text(x_low + (j + 0.5) * dx, y_low + (i + 0.5) * dy, f"{grid[i, j]:.3g}", ha="center",
                              va="center", fontsize=7, color="white")
    axis.set_xlabel(space[x_axis]["name"])
    axis.set_ylabel(space[y_axis]["name"] if y_axis is not None else "")
    others = [a["name"] for k, a in enumerate(space) if k not in (x_axis, y_axis)]
    filled = int((~np.isnan(grid)).sum())
    title = f"MAP-Elites archive: {len(run.archive)} elites"
    if others:
        title += f"\n(best over {', '.join(others)}; {filled} of {x_bins * y_bins} cells shown filled)"
    axis.set_title(title, fontsize=10)
    return _finish(plt, figure, Path(path))


# -- lineage ----------------------------------------------------------------------------------
def plot_lineage(run, path: str | Path, candidate_id: int | None = None, max_nodes: int = 60) -> Path:
    """The ancestry graph of ``candidate_id`` (default: the best loss)."""
    subtitle = ""
    if candidate_id is None:
        ranked = run.best(len(run.candidates))
        if ranked.empty:
            raise PlotSkipped("no loss was scored")
        candidate_id = int(ranked.index[0])
        with_parents = ranked[ranked["parents"].map(len) > 0]
        if not run.data.candidates[candidate_id].parents and not with_parents.empty:
            subtitle = f"\n(the best loss, {ranked.iloc[0]['name']}, has no parents; best loss with ancestors shown)"
            candidate_id = int(with_parents.index[0])
    order = run.data.lineage(candidate_id)[:max_nodes]
    nodes = {cid for _, cid in order}
    candidates = run.data.candidates
    plt = _pyplot()
    from matplotlib import cm, colors

    by_generation: dict[int, list[int]] = {}
    for _, cid in order:
        by_generation.setdefault(candidates[cid].generation, []).append(cid)
    position = {}
    for generation, members in by_generation.items():
        for rank, cid in enumerate(sorted(members)):
            position[cid] = (generation, rank - (len(members) - 1) / 2)
    scores = [run.data.fitness_of(cid) for cid in nodes]
    finite = [s for s in scores if s is not None]
    low, high = min(finite, default=0.0), max(finite, default=1.0)
    if high - low < 1e-9:  # one score: centre it in a unit range rather than a degenerate one
        low, high = low - 0.5, high + 0.5
    norm = colors.Normalize(low, high)
    colour_map = plt.get_cmap("viridis")
    height = max(3.0, 0.6 * max(len(m) for m in by_generation.values()) + 1.5)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.8 * len(by_generation) + 2), height))
    for cid in nodes:
        for parent in candidates[cid].parents:
            if parent in position:
                axis.annotate("", xy=position[cid], xytext=position[parent],
                              arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8, "shrinkA": 8, "shrinkB": 8})
    for cid in nodes:
        x, y = position[cid]
        score = run.data.fitness_of(cid)
        colour = "lightgrey" if score is None else colour_map(norm(score))
        axis.scatter([x], [y], s=260 if cid == candidate_id else 140, color=colour, edgecolors="black",
                     linewidths=1.5 if cid == candidate_id else 0.5, zorder=3)
        label = f"{candidates[cid].name[:18]}\n{'-' if score is None else f'{score:.3g}'}"
        axis.annotate(label, (x, y), xytext=(0, 11), textcoords="offset points", ha="center", fontsize=7)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colour_map), ax=axis, label="fitness")
    axis.set_xlabel("generation")
    axis.set_yticks([])
    generations = sorted(by_generation)
    axis.set_xticks(generations)
    axis.set_xlim(generations[0] - 0.6, generations[-1] + 0.6)
    ys = [p[1] for p in position.values()]
    axis.set_ylim(min(ys) - 0.8, max(ys) + 0.9)
    truncated = f", first {max_nodes} ancestors" if len(run.data.lineage(candidate_id)) > max_nodes else ""
    axis.set_title(f"Lineage of {candidates[candidate_id].name} (id {candidate_id}{truncated}){subtitle}",
                   fontsize=10)
    return _finish(plt, figure, Path(path))


# -- loss shape (DiscoPOP figure 6) -----------------------------------------------------------
def dpo_reference(run_dpo_code: str | None = None) -> str | None:
    """DPO's code for the loss-shape reference: the run's own ``dpo`` seed, else the shipped one."""
    from fitness.preference import PREFERENCE_SEEDS

    return run_dpo_code or next((s.code for s in PREFERENCE_SEEDS if s.name == "dpo"), None)


def plot_loss_shape(run, path: str | Path, top: int = 5, notes: list[str] | None = None,
                    z_range: tuple[float, float] = (-10.0, 10.0)) -> Path:
    import numpy as np

    from archives.shapes import loss_shapes

    notes = notes if notes is not None else []
    baseline = run.candidates[(run.candidates["operator"] == "seed") & (run.candidates["name"] == "dpo")]
    dpo_code = dpo_reference(None if baseline.empty else baseline.iloc[0]["code"])
    lines: list[tuple[str, str, bool]] = [("dpo", dpo_code, True)] if dpo_code else []
    for _, row in run.best(top).iterrows():
        if row["code"] != dpo_code:
            lines.append((f"{row['name']} ({row['fitness']:.3g})", row["code"], False))
    seeds = run.candidates[run.candidates["operator"] == "seed"]
    # Genome code (and the plug-in the run's settings name) runs in a jailed child, never here.
    drawn = loss_shapes(run.config, run.fitness_name, None if seeds.empty else seeds.iloc[0]["code"],
                        [{"label": label, "code": code, "role": "dpo" if is_dpo else "best"}
                         for label, code, is_dpo in lines], z_range=z_range, points=401)
    notes.extend(f"loss_shape: {note}" if not note.startswith("loss_shape") else note
                 for note in drawn.get("notes") or [])
    if not drawn.get("applicable"):
        raise PlotSkipped(drawn.get("reason") or "no loss shape could be drawn")
    z = np.asarray(drawn["z"])
    curves = []
    for curve in drawn["curves"]:
        if "error" in curve:
            notes.append(f"loss_shape: {curve['label']} skipped ({curve['error'][:120]})")
        else:
            curves.append((curve["label"], np.asarray(curve["values"]), np.asarray(curve["gradient"]),
                           curve["role"] == "dpo"))
    if not curves:
        raise PlotSkipped("no loss could be evaluated on the grid")
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    for index, (label, values, slope, is_dpo) in enumerate(curves):
        style = {"color": "black", "ls": "--", "lw": 1.6} if is_dpo else {"color": f"C{index % 10}", "lw": 1.3}
        left.plot(z, values, label=label, **style)
        right.plot(z, slope, label=label, **style)
    for axis, key in ((left, 1), (right, 2)):
        stacked = np.concatenate([c[key] for c in curves])
        low, high = np.percentile(stacked, [1, 99])
        pad = 0.1 * (high - low or 1.0)
        axis.set_ylim(low - pad, high + pad)
        axis.axvline(0, color="grey", lw=0.5)
        axis.axhline(0, color="grey", lw=0.5)
        axis.grid(alpha=0.3)
        axis.set_xlabel(r"$\beta\rho$ (log-ratio difference times $\beta$)")
    left.set_ylabel(r"loss $f(\beta\rho)$")
    right.set_ylabel(r"gradient $f'(\beta\rho)$")
    left.set_title("Loss shape (cf. DiscoPOP fig. 6)", fontsize=10)
    right.set_title("Gradient", fontsize=10)
    left.legend(fontsize=7)
    figure.suptitle(f"beta = {drawn['beta']:g}; batch-statistic losses see the whole grid as one batch", fontsize=8)
    return _finish(plt, figure, Path(path))
