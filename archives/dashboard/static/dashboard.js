// evoloss dashboard: fills the pages in from the JSON API and follows runs in progress.
// Untrusted text (names, code, thoughts, errors) only ever reaches the page through
// textContent, or through plotText() for Plotly labels; never through innerHTML.
"use strict";

(function () {
  const page = document.body.dataset.page;
  const key = document.body.dataset.key;
  const WAIT_S = 10;
  const RETRY_MS = 2000;

  // -- helpers ---------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function num(value, digits = 4) {
    if (value === null || value === undefined || Number.isNaN(value)) return "-";
    if (typeof value !== "number") return String(value);
    return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  }
  function signed(value) {
    return value === null || value === undefined ? "-" : (value >= 0 ? "+" : "") + value.toFixed(4);
  }
  // Plotly reads a few HTML-like tags in labels: entities make them plain text.
  function plotText(value) {
    return String(value === null || value === undefined ? "" : value)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function runUrl(runKey) { return "/runs/" + encodeURIComponent(runKey); }
  function candidateUrl(runKey, id) { return runUrl(runKey) + "/candidates/" + encodeURIComponent(id); }
  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }
  function byId(id) { return document.getElementById(id); }
  function setText(id, text) { const node = byId(id); if (node) node.textContent = text; }
  function statusBadge(status) { return el("span", { class: "status status-" + (status || "pending") }, status || "-"); }
  function fill(tbodyId, rows, empty) {
    const body = byId(tbodyId);
    if (!body) return;
    body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 12, class: "muted" }, empty || "none"))]));
  }
  function candidateLink(id, name) { return el("a", { href: candidateUrl(key, id) }, name === undefined ? String(id) : name); }
  function plotReady() { return typeof window.Plotly !== "undefined"; }
  function whenPlotly(callback) {
    if (plotReady()) callback(); else window.addEventListener("load", callback, { once: true });
  }
  const baseLayout = { margin: { l: 50, r: 20, t: 10, b: 40 }, font: { size: 11 }, hovermode: "closest",
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fff" };
  const plotConfig = { displaylogo: false, responsive: true };
  function setStatus(status) {
    const badge = byId("run-status");
    if (badge && status) { badge.textContent = status; badge.className = "status status-" + status; }
    const live = byId("live");
    if (live) live.hidden = status !== "running";
  }

  // -- runs page -------------------------------------------------------------------------
  function runsPage() {
    const selected = new Set();
    async function load() {
      const data = await getJSON("/api/runs");
      fill("runs-body", data.runs.map((run) => {
        const box = el("input", { type: "checkbox", "data-key": run.key, "aria-label": "compare " + run.key,
          onchange: (event) => { if (event.target.checked) selected.add(run.key); else selected.delete(run.key); compare(); } });
        box.checked = selected.has(run.key);
        if (run.error) {
          return el("tr", { "data-key": run.key }, el("td", {}), el("td", {}, el("a", { href: runUrl(run.key) }, run.key)),
            el("td", { colspan: 2, class: "error" }, run.error), el("td", {}, statusBadge(run.status)), el("td", { colspan: 6 }));
        }
        return el("tr", { "data-key": run.key },
          el("td", {}, box), el("td", {}, el("a", { href: runUrl(run.key), class: "run-link" }, run.key)),
          el("td", {}, run.fitness), el("td", {}, run.operators.join(", ") + (run.asynchronous ? " (async)" : "")),
          el("td", {}, statusBadge(run.status)), el("td", { class: "num" }, run.evaluations),
          el("td", {}, run.best_id === null ? "-" : el("a", { href: candidateUrl(run.key, run.best_id) }, run.best_name)),
          el("td", { class: "num" }, num(run.best_fitness)),
          el("td", { class: "num", title: run.baseline ? "vs " + run.baseline : "" }, signed(run.delta)),
          el("td", { class: "num" }, run.llm_calls ? "$" + run.llm_cost_usd.toFixed(4) : "-"),
          el("td", {}, run.last_write ? new Date(run.last_write * 1000).toLocaleString() : "-"));
      }), "no run found here");
    }
    async function compare() {
      const keys = [...selected];
      setText("compare-note", keys.length >= 2 ? keys.length + " runs" : "tick two or more runs above");
      const histories = await Promise.all(keys.map((k) => getJSON("/api/runs/" + encodeURIComponent(k) + "/history")));
      const traces = histories.map((h) => ({ x: h.x, y: h.best, name: plotText(h.key), mode: "lines+markers", type: "scatter" }));
      const xLabel = histories.length ? histories[0].x_label : "generation";
      whenPlotly(() => Plotly.react("compare-plot", traces, { ...baseLayout, showlegend: true,
        xaxis: { title: { text: xLabel } }, yaxis: { title: { text: "best fitness so far" } } }, plotConfig));
    }
    load();
    setInterval(() => load().catch(() => {}), 2000);
  }

  // -- run page --------------------------------------------------------------------------
  function runPage() {
    const state = { cursor: -1, version: -1, seen: -1, view: null, feed: [], archiveBound: false, fitnessBound: false,
      loading: false, again: false };

    function jitter(id) { return (((id * 0.6180339887) % 1) - 0.5) * 0.5; }

    function drawFitness(view) {
      const summary = view.summary;
      const traces = [];
      const shapes = [];
      const notes = [];
      if (view.asynchronous) {
        let best = -Infinity;
        const xs = view.points.map((_, index) => index + 1);
        const bests = view.points.map((p) => (best = Math.max(best, p.fitness)));
        traces.push({ x: xs, y: view.points.map((p) => p.fitness), customdata: view.points.map((p) => p.id),
          text: view.points.map((p) => plotText(p.name)), mode: "markers", type: "scatter", name: "evaluation",
          marker: { size: 5, color: "rgba(90,110,140,0.45)" }, hovertemplate: "%{text}<br>%{y:.4f}<extra></extra>" });
        traces.push({ x: xs, y: bests, mode: "lines", name: "best so far", line: { color: "#2b6cb0", width: 2 } });
      } else {
        traces.push({ x: view.points.map((p) => p.generation + jitter(p.id)), y: view.points.map((p) => p.fitness),
          customdata: view.points.map((p) => p.id), text: view.points.map((p) => plotText(p.name)), mode: "markers",
          type: "scatter", name: "evaluation", marker: { size: 5, color: "rgba(90,110,140,0.4)" },
          hovertemplate: "%{text}<br>%{y:.4f}<extra></extra>" });
        const history = summary.history;
        const gens = history.map((g) => g.gen);
        traces.push({ x: gens, y: history.map((g) => g.best), mode: "lines+markers", name: "best so far", line: { color: "#2b6cb0", width: 2 } });
        traces.push({ x: gens, y: history.map((g) => g.max), mode: "lines", name: "generation max", line: { color: "#dd6b20", dash: "dash" } });
        traces.push({ x: gens, y: history.map((g) => g.mean), mode: "lines", name: "generation mean", line: { color: "#38a169", dash: "dot" } });
      }
      for (const seed of summary.seeds) {
        if (seed.fitness === null) continue;
        const isBaseline = seed.name === summary.baseline;
        shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: seed.fitness, y1: seed.fitness,
          line: { color: isBaseline ? "#000" : "#999", width: isBaseline ? 1.5 : 0.8, dash: isBaseline ? "solid" : "dot" } });
        notes.push({ xref: "paper", x: 1, xanchor: "left", y: seed.fitness, text: plotText(seed.name), showarrow: false,
          font: { size: 9, color: isBaseline ? "#000" : "#777" } });
      }
      const layout = { ...baseLayout, margin: { l: 50, r: 70, t: 10, b: 40 }, shapes, annotations: notes,
        legend: { orientation: "h", y: -0.18 },
        xaxis: { title: { text: view.asynchronous ? "evaluation" : "generation" } },
        yaxis: { title: { text: "fitness (" + plotText(summary.fitness) + ")" } } };
      Plotly.react("fitness-plot", traces, layout, plotConfig);
      if (!state.fitnessBound) {
        state.fitnessBound = true;
        byId("fitness-plot").on("plotly_click", (event) => {
          const point = event.points[0];
          if (point && point.customdata !== undefined && point.customdata !== null) location.href = candidateUrl(key, point.customdata);
        });
      }
    }

    function fillAxes(axes) {
      const xSelect = byId("axis-x");
      const ySelect = byId("axis-y");
      if (xSelect.options.length === axes.length) return;
      const wide = axes.map((a, i) => [a, i]).filter(([a]) => a.bins > 1).map(([, i]) => i);
      xSelect.replaceChildren(...axes.map((a, i) => el("option", { value: i }, a.name)));
      ySelect.replaceChildren(el("option", { value: "" }, "(none)"), ...axes.map((a, i) => el("option", { value: i }, a.name)));
      xSelect.value = String(wide.length ? wide[0] : 0);
      ySelect.value = wide.length > 1 ? String(wide[1]) : "";
      for (const select of [xSelect, ySelect]) select.addEventListener("change", () => state.view && drawArchive(state.view));
    }

    function drawArchive(view) {
      const axes = view.summary.axes;
      const plot = byId("archive-plot");
      if (!axes.length) { plot.replaceChildren(el("p", { class: "muted" }, "This run saved no descriptor space.")); return; }
      fillAxes(axes);
      const xi = Number(byId("axis-x").value);
      const yRaw = byId("axis-y").value;
      const yi = yRaw === "" ? null : Number(yRaw);
      const xAxis = axes[xi];
      const yAxis = yi === null ? null : axes[yi];
      const nx = xAxis.bins, ny = yAxis ? yAxis.bins : 1;
      const z = Array.from({ length: ny }, () => Array(nx).fill(null));
      const ids = Array.from({ length: ny }, () => Array(nx).fill(null));
      const names = Array.from({ length: ny }, () => Array(nx).fill(""));
      for (const elite of view.elites) {
        const i = yi === null ? 0 : elite.cell[yi];
        const j = elite.cell[xi];
        if (elite.fitness === null) continue;
        if (z[i][j] === null || elite.fitness > z[i][j]) { z[i][j] = elite.fitness; ids[i][j] = elite.id; names[i][j] = plotText(elite.id + " " + elite.name); }
      }
      const centres = (axis) => Array.from({ length: axis.bins }, (_, k) => axis.low + (k + 0.5) * (axis.high - axis.low) / axis.bins);
      const xs = centres(xAxis);
      const ys = yAxis ? centres(yAxis) : [0];
      const filled = [];
      z.forEach((row, i) => row.forEach((value, j) => { if (value !== null) filled.push({ x: xs[j], y: ys[i], id: ids[i][j] }); }));
      plot.dataset.cells = JSON.stringify(filled);
      Plotly.react(plot, [{ type: "heatmap", z, x: xs, y: ys, customdata: ids, text: names, colorscale: "Viridis",
        hoverongaps: false, hovertemplate: "%{text}<br>fitness %{z:.4f}<extra></extra>",
        colorbar: { title: { text: "best fitness", side: "right" } } }],
      { ...baseLayout, xaxis: { title: { text: plotText(xAxis.name) } },
        yaxis: { title: { text: yAxis ? plotText(yAxis.name) : "" }, showticklabels: !!yAxis } }, plotConfig);
      if (!state.archiveBound) {
        state.archiveBound = true;
        plot.on("plotly_click", (event) => {
          const point = event.points[0];
          if (point && point.customdata !== null && point.customdata !== undefined) location.href = candidateUrl(key, point.customdata);
        });
      }
    }

    function drawLlm(view) {
      const timeline = view.llm_timeline;
      const plot = byId("llm-plot");
      if (!timeline.time.length) { plot.replaceChildren(el("p", { class: "muted", id: "no-llm" }, "This run made no LLM call.")); plot.style.height = "auto"; return; }
      plot.style.height = "";
      const when = timeline.time.map((t) => new Date(t * 1000));
      Plotly.react(plot, [
        { x: when, y: timeline.cost_usd, name: "cost USD", mode: "lines", line: { color: "#c05621" } },
        { x: when, y: timeline.tokens, name: "tokens", mode: "lines", yaxis: "y2", line: { color: "#2b6cb0" } },
        { x: when, y: timeline.calls, name: "calls", mode: "lines", yaxis: "y3", line: { color: "#718096", dash: "dot" } },
      ], { ...baseLayout, margin: { l: 50, r: 90, t: 10, b: 40 }, legend: { orientation: "h", y: -0.2 },
        xaxis: { domain: [0, 0.86] }, yaxis: { title: { text: "cost USD" } },
        yaxis2: { title: { text: "tokens" }, overlaying: "y", side: "right" },
        yaxis3: { overlaying: "y", side: "right", anchor: "free", position: 0.97, showgrid: false } }, plotConfig);
    }

    function fillTables(view) {
      const summary = view.summary;
      const base = summary.baseline_fitness;
      fill("top-body", summary.top.map((row) => el("tr", {},
        el("td", {}, candidateLink(row.id, String(row.id))), el("td", {}, candidateLink(row.id, row.name)),
        el("td", { class: "num" }, num(row.fitness)), el("td", { class: "num" }, base === null ? "-" : signed(row.fitness - base)),
        el("td", {}, row.generation), el("td", {}, row.operator))), "no loss scored yet");
      fill("operators-body", view.operators.map((row) => el("tr", {},
        el("td", {}, row.operator), el("td", { class: "num" }, row.made), el("td", { class: "num" }, row.valid),
        el("td", { class: "num" }, row.improved), el("td", { class: "num" }, num(row.valid_share, 2)),
        el("td", { class: "num" }, row.choice_probability === null ? "-" : (100 * row.choice_probability).toFixed(0) + "%"))));
      fill("failures-body", summary.failure_kinds.map((f) => el("tr", {},
        el("td", { class: "num" }, f.count), el("td", {}, f.kind),
        el("td", { class: "error" }, (f.example || "").slice(0, 200) + " ", candidateLink(f.example_id, "(" + f.example_id + ")")))),
      "no failure");
      const llm = summary.llm;
      fill("llm-body", llm ? [...Object.entries(llm.by_model), ["total", llm]].map(([name, g]) => el("tr", {},
        el("td", {}, name), el("td", { class: "num" }, g.calls), el("td", { class: "num" }, g.failed_calls),
        el("td", { class: "num" }, g.tokens_in), el("td", { class: "num" }, g.tokens_out),
        el("td", { class: "num" }, g.cost_usd.toFixed(4)))) : [], "no LLM calls");
      fill("ladder-body", summary.fidelity_ladder.map((s) => el("tr", {},
        el("td", {}, s.stage), el("td", { class: "num" }, s.evaluated), el("td", { class: "num" }, s.ok),
        el("td", {}, s.best_id === null ? "-" : candidateLink(s.best_id, s.best_name)),
        el("td", { class: "num" }, num(s.best_fitness)), el("td", { class: "num" }, num(s.baseline_fitness)))),
      "one fidelity stage (no ladder)");
      const transfer = summary.transfer;
      byId("transfer-head").replaceChildren(el("tr", {}, el("th", {}, "loss"), el("th", { class: "num" }, summary.fitness || "fitness"),
        ...transfer.labels.map((label) => el("th", { class: "num" }, label))));
      fill("transfer-body", [
        ...transfer.rows.map((row) => el("tr", {}, el("td", {}, candidateLink(row.id, row.id + " " + row.name)),
          el("td", { class: "num" }, num(row.fitness)), ...transfer.labels.map((label) => el("td", { class: "num" }, num(row.extra[label]))))),
        ...(transfer.rows.length ? [el("tr", {}, el("td", {}, "rank correlation"), el("td", {}),
          ...transfer.labels.map((label) => el("td", { class: "num" }, num(transfer.spearman[label], 2))))] : []),
      ], "not re-evaluated (python -m engine reevaluate RUN --top K --fitness OTHER)");
    }

    function fillCards(view) {
      const s = view.summary;
      setText("stat-evaluations", s.evaluations);
      setText("stat-generations", s.generations + " / " + s.generations_planned);
      setText("stat-best", num(s.best_fitness));
      setText("stat-best-name", s.best_name || "");
      setText("stat-baseline", num(s.baseline_fitness));
      setText("stat-baseline-label", "baseline " + (s.baseline || ""));
      setText("stat-archive", s.elites + " elites");
      setText("stat-coverage", "coverage " + num(s.coverage, 3) + " · QD " + num(s.qd_score, 2));
      const failed = Object.values(s.failed).reduce((a, b) => a + b, 0) - s.invalid;
      setText("stat-failed", s.invalid + " / " + failed);
      setText("stat-llm", "$" + num(s.llm_cost_usd, 4));
      setText("stat-llm-sub", s.llm_calls + " calls · " + (s.llm_tokens_in + s.llm_tokens_out) + " tokens");
      const stopped = byId("stopped");
      stopped.hidden = !s.stopped;
      if (s.stopped) stopped.textContent = "stopped early in generation " + s.stopped.generation + ": " + s.stopped.reason;
    }

    function drawFeed(fresh) {
      const rows = state.feed.slice(-15).reverse();
      fill("feed-body", rows.map((row) => el("tr", { class: fresh.has(row.eval_id) ? "fresh" : null, "data-eval": row.eval_id },
        el("td", {}, candidateLink(row.candidate_id, String(row.candidate_id))),
        el("td", {}, candidateLink(row.candidate_id, row.name === null ? "?" : row.name)),
        el("td", {}, row.generation === null ? "-" : row.generation), el("td", {}, statusBadge(row.status)),
        el("td", { class: "num" }, num(row.fitness)), el("td", { class: "error" }, (row.error || "").slice(0, 160)))),
      "no evaluation yet");
    }

    async function loadView() {
      const view = await getJSON("/api/runs/" + encodeURIComponent(key));
      state.view = view;
      state.version = view.version;
      if (state.seen < view.version) state.seen = view.version;
      setStatus(view.status);
      fillCards(view);
      fillTables(view);
      whenPlotly(() => { drawFitness(view); drawArchive(view); drawLlm(view); });
    }

    async function poll() {
      // Long poll: the server answers as soon as there is news, or after WAIT_S seconds.
      const events = await getJSON("/api/runs/" + encodeURIComponent(key) + "/events?after=" + state.cursor +
        "&version=" + state.seen + "&wait=" + WAIT_S);
      state.cursor = events.cursor;
      setStatus(events.status);
      if (events.evaluations.length) {
        state.feed.push(...events.evaluations);
        state.feed = state.feed.slice(-200);
        drawFeed(new Set(state.feed.length === events.evaluations.length ? [] : events.evaluations.map((e) => e.eval_id)));
      } else if (!state.feed.length) {
        drawFeed(new Set());
      }
      state.seen = events.version;
      if (events.version !== state.version) refreshView();  // drawn meanwhile: polling goes on
    }

    // One view request at a time; news that comes during one asks for one more.
    function refreshView() {
      if (state.loading) { state.again = true; return; }
      state.loading = true;
      loadView().catch(() => {}).finally(() => {
        state.loading = false;
        if (state.again) { state.again = false; refreshView(); }
      });
    }

    async function loop() {
      let delay = 50;
      try { await poll(); } catch (error) { delay = RETRY_MS; /* the server may be restarting: try again */ }
      setTimeout(loop, delay);
    }
    loadView().then(loop, loop);
  }

  // -- lineage graphs --------------------------------------------------------------------
  function drawTree(plotId) {
    const plot = byId(plotId);
    if (!plot) return;
    getJSON(plot.dataset.tree).then((tree) => whenPlotly(() => {
      if (!tree.nodes.length) { plot.replaceChildren(el("p", { class: "muted" }, "nothing to draw")); return; }
      const byGeneration = new Map();
      for (const node of tree.nodes) {
        const g = node.generation === null ? 0 : node.generation;
        if (!byGeneration.has(g)) byGeneration.set(g, []);
        byGeneration.get(g).push(node);
      }
      const position = new Map();
      for (const [g, members] of byGeneration) {
        members.sort((a, b) => a.id - b.id);
        members.forEach((node, rank) => position.set(node.id, [g, rank - (members.length - 1) / 2]));
      }
      const ex = [], ey = [];
      for (const [parent, child] of tree.edges) {
        const a = position.get(parent), b = position.get(child);
        ex.push(a[0], b[0], null); ey.push(a[1], b[1], null);
      }
      const scored = tree.nodes.filter((n) => n.fitness !== null);
      const unscored = tree.nodes.filter((n) => n.fitness === null);
      const showLabels = tree.nodes.length <= 60;
      const nodeTrace = (nodes, extra) => ({
        x: nodes.map((n) => position.get(n.id)[0]), y: nodes.map((n) => position.get(n.id)[1]),
        customdata: nodes.map((n) => n.id), mode: showLabels ? "markers+text" : "markers", type: "scatter",
        text: nodes.map((n) => plotText(n.id + " " + n.name)), textposition: "top center", textfont: { size: 9 },
        hovertext: nodes.map((n) => plotText(n.id + " " + n.name + " · " + (n.operator || "") + " · " + (n.fitness === null ? (n.status || "not scored") : n.fitness.toFixed(4)))),
        hoverinfo: "text", ...extra,
      });
      const traces = [
        { x: ex, y: ey, mode: "lines", type: "scatter", hoverinfo: "skip", line: { color: "#a0aec0", width: 1 }, showlegend: false },
        nodeTrace(unscored, { name: "not scored", marker: { size: unscored.map((n) => (n.root ? 18 : 11)), color: "#cbd5e0", line: { color: "#4a5568", width: unscored.map((n) => (n.root ? 2.5 : 0.5)) } } }),
        nodeTrace(scored, { name: "scored", marker: { size: scored.map((n) => (n.root ? 18 : 11)), color: scored.map((n) => n.fitness), colorscale: "Viridis", showscale: true,
          colorbar: { title: { text: "fitness", side: "right" } }, line: { color: "#1a202c", width: scored.map((n) => (n.root ? 2.5 : 0.5)) } } }),
      ];
      Plotly.react(plot, traces, { ...baseLayout, showlegend: false, xaxis: { title: { text: "generation" }, dtick: 1 },
        yaxis: { visible: false }, annotations: tree.truncated ? [{ xref: "paper", yref: "paper", x: 0, y: 1, showarrow: false,
          text: "first " + tree.nodes.length + " nodes shown" }] : [] }, plotConfig);
      plot.dataset.nodes = JSON.stringify(tree.nodes.map((n) => ({ id: n.id, x: position.get(n.id)[0], y: position.get(n.id)[1] })));
      plot.on("plotly_click", (event) => {
        const point = event.points[0];
        if (point && point.customdata !== undefined) location.href = candidateUrl(key, point.customdata);
      });
    })).catch((error) => plot.replaceChildren(el("p", { class: "error" }, String(error))));
  }

  // -- candidate page --------------------------------------------------------------------
  function candidatePage() {
    drawTree("tree-plot");
    const id = document.body.dataset.candidate;
    getJSON("/api/runs/" + encodeURIComponent(key) + "/candidates/" + id + "/shape").then((shape) => whenPlotly(() => {
      const note = byId("shape-note");
      if (!shape.applicable) {
        note.textContent = shape.reason || "no loss shape";
        byId("shape-plot").hidden = true; byId("gradient-plot").hidden = true;
        return;
      }
      const good = shape.curves.filter((c) => !c.error);
      const failed = shape.curves.filter((c) => c.error);
      note.textContent = "β = " + shape.beta + "; ρ is the log-ratio difference." +
        (failed.length ? " Not drawn: " + failed.map((c) => c.label + " (" + c.error + ")").join("; ") : "");
      const style = (c) => (c.role === "dpo" ? { color: "#000", dash: "dash", width: 1.6 } : c.role === "candidate"
        ? { color: "#2b6cb0", width: 2.6 } : { width: 1.2 });
      // The axes fit the candidate and DPO; a parent far off may leave the frame.
      const framed = good.filter((c) => c.role !== "parent");
      const range = (key) => {
        const all = framed.flatMap((c) => c[key]).filter(Number.isFinite).sort((a, b) => a - b);
        if (!all.length) return undefined;
        const low = all[Math.floor(0.01 * (all.length - 1))], high = all[Math.ceil(0.99 * (all.length - 1))];
        const pad = 0.1 * ((high - low) || 1);
        return [low - pad, high + pad];
      };
      for (const [plotId, field, label] of [["shape-plot", "values", "loss f(βρ)"], ["gradient-plot", "gradient", "gradient f′(βρ)"]]) {
        Plotly.react(plotId, good.map((c) => ({ x: shape.z, y: c[field], name: plotText(c.label), mode: "lines", line: style(c) })),
          { ...baseLayout, legend: { orientation: "h", y: -0.25, font: { size: 9 } }, xaxis: { title: { text: "βρ" }, zeroline: true },
            yaxis: { title: { text: label }, range: range(field) } }, plotConfig);
      }
    })).catch((error) => setText("shape-note", "loss shape unavailable: " + error));
  }

  if (page === "runs") runsPage();
  else if (page === "run") runPage();
  else if (page === "candidate") candidatePage();
  else if (page === "lineage") drawTree("tree-plot");
})();
