// Plotly figures. The plotly.js bundle is served by TRAICE itself (offline) and loaded only
// when a page with charts opens.
import { co2Unit, energyUnit, roundAccuracy } from "./format.js";

const BUNDLE = "/static/vendor/plotly.min.js";
const COLORS = ["#2e7d4f", "#3b7fb6", "#d08c2f", "#8a63b0", "#c4534f", "#5fae86", "#2f9aa0", "#b8963a", "#6c7a89", "#a0522d"];
const SERVER_COLOR = "#8d9992";

// Plotly shows names as its own small HTML (<b>, <br>, <a>...): neutralise tags in API strings.
const esc = (s) => String(s ?? "").replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

let loading = null;
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  loading ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = BUNDLE;
    script.onload = () => (window.Plotly ? resolve(window.Plotly) : reject(new Error("no Plotly")));
    script.onerror = () => { loading = null; reject(new Error(`could not load ${BUNDLE}`)); };
    document.head.appendChild(script);
  });
  return loading;
}

const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
const AXIS = { gridcolor: "#e7ede8", zerolinecolor: "#cfd9d2", linecolor: "#cfd9d2", automargin: true };

function layout(extra) {
  return {
    font: { family: "system-ui, -apple-system, 'Segoe UI', sans-serif", size: 12, color: "#1d2b22" },
    paper_bgcolor: "#ffffff",
    plot_bgcolor: "#ffffff",
    colorway: COLORS,
    margin: { l: 60, r: 18, t: 12, b: 48 },
    hoverlabel: { font: { family: "system-ui, sans-serif" } },
    legend: { orientation: "h", y: -0.3, x: 0, font: { size: 11 } },
    ...extra,
    xaxis: { ...AXIS, ...(extra.xaxis || {}) },
    yaxis: { ...AXIS, ...(extra.yaxis || {}) },
  };
}

// A centred note on an empty chart.
const empty = (text) => [{ text: esc(text), showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: { color: "#6b7a70", size: 13 } }];

export async function draw(el, figure) {
  const Plotly = await loadPlotly();
  if (!el.isConnected) return;
  el.classList.remove("plot-missing");
  await Plotly.react(el, figure.data, figure.layout, CONFIG);
}

export function purge(el) {
  if (window.Plotly && el) window.Plotly.purge(el);
}

export function showMissing(el) {
  el.classList.add("plot-missing");
  el.textContent = "Charts need the plotly.js bundle at /static/vendor/plotly.min.js, which this server does not serve.";
}

// Plotly reads dates without a time zone as they are: keep UTC, like every table.
const plotTime = (value) => new Date(value).toISOString().replace("Z", "");

function cumulative(rounds) {
  let total = 0;
  return [...rounds].sort((a, b) => a.round - b.round).map((r) => ({ ...r, cumulative_kg: (total += r.emissions_kg || 0) }));
}

// Cumulative emissions over time, one point per round (at its end).
export function emissionsFigure(rounds) {
  const points = cumulative(rounds).filter((r) => r.ended_at);
  const [factor, unit] = co2Unit(points.length ? points[points.length - 1].cumulative_kg : 0);
  return {
    data: [{
      type: "scatter", mode: "lines+markers", name: "cumulative emissions",
      x: points.map((r) => plotTime(r.ended_at)),
      y: points.map((r) => r.cumulative_kg * factor),
      customdata: points.map((r) => r.round),
      line: { color: COLORS[0], width: 2, shape: "linear" },
      marker: { size: points.length > 60 ? 3 : 6 },
      fill: "tozeroy", fillcolor: "rgba(46,125,79,0.08)",
      hovertemplate: `round %{customdata}<br>%{x|%H:%M:%S} UTC<br>%{y:.3g} ${unit} CO₂e<extra></extra>`,
    }],
    layout: layout({
      xaxis: { title: { text: "time (UTC)" }, type: "date" },
      yaxis: { title: { text: `${unit} CO₂e` }, rangemode: "tozero" },
      showlegend: false,
      annotations: points.length ? [] : empty("No finished round yet"),
    }),
  };
}

// Energy per round, stacked by node: `nodes` are the nodes drawn on their own (the largest),
// `rows` their per-round energy; the rest of each round's total is "other nodes".
export function energyFigure(rounds, perNode) {
  const ordered = [...rounds].sort((a, b) => a.round - b.round);
  const x = ordered.map((r) => r.round);
  const maxTotal = Math.max(0, ...ordered.map((r) => r.energy_kwh || 0));
  const [factor, unit] = energyUnit(maxTotal);
  const hover = `round %{x}<br>%{fullData.name}: %{y:.3g} ${unit}<extra></extra>`;
  const many = x.length > 120; // hundreds of rounds: stacked areas draw much faster than bars
  const layer = (trace) => (many
    ? { ...trace, type: "scatter", mode: "lines", stackgroup: "energy", line: { width: 0.5, color: trace.marker.color }, fillcolor: trace.marker.color }
    : trace);
  let data;
  if (perNode) {
    const byNode = new Map(perNode.nodes.map((n) => [n.node_id, new Map()]));
    for (const row of perNode.rows) {
      const cells = byNode.get(row.node_id);
      if (cells) cells.set(row.round, (cells.get(row.round) || 0) + (row.energy_kwh || 0));
    }
    let colour = 0;
    data = perNode.nodes.map((node) => ({
      type: "bar", name: esc(node.role === "server" ? `${node.node_id} (FL server)` : node.node_id),
      x, y: x.map((round) => (byNode.get(node.node_id).get(round) || 0) * factor),
      marker: { color: node.role === "server" ? SERVER_COLOR : COLORS[colour++ % COLORS.length] },
      hovertemplate: hover,
    }));
    if (perNode.others > 0) {
      const shown = x.map((round) => perNode.nodes.reduce((s, n) => s + (byNode.get(n.node_id).get(round) || 0), 0));
      data.push({
        type: "bar", name: `${perNode.others.toLocaleString("en")} other nodes`,
        x, y: ordered.map((r, i) => Math.max(0, (r.energy_kwh || 0) - shown[i]) * factor),
        marker: { color: "#c9d3cc" }, hovertemplate: hover,
      });
    }
  } else { // no per-client data (yet): stack by component when they add up, else the total
    const parts = ordered.reduce((s, r) => s + (r.cpu_energy_kwh || 0) + (r.gpu_energy_kwh || 0) + (r.ram_energy_kwh || 0), 0);
    const total = ordered.reduce((s, r) => s + (r.energy_kwh || 0), 0);
    data = parts > 0 && Math.abs(parts - total) <= 1e-6 * total
      ? [["cpu_energy_kwh", "CPU"], ["gpu_energy_kwh", "GPU"], ["ram_energy_kwh", "RAM"]].map(([key, name], i) => ({
        type: "bar", name, x, y: ordered.map((r) => (r[key] || 0) * factor), marker: { color: COLORS[i] }, hovertemplate: hover,
      }))
      : [{ type: "bar", name: "all nodes", x, y: ordered.map((r) => (r.energy_kwh || 0) * factor), marker: { color: COLORS[0] }, hovertemplate: hover }];
  }
  data = data.map(layer);
  return {
    data,
    layout: layout({
      barmode: "stack", bargap: x.length > 100 ? 0 : 0.15, legend: { orientation: "h", y: -0.3, x: 0, font: { size: 11 }, traceorder: "normal" },
      xaxis: { title: { text: "round" }, type: "linear" },
      yaxis: { title: { text: unit } },
      showlegend: data.length > 1,
      annotations: ordered.length ? [] : empty("No round yet"),
    }),
  };
}

// Accuracy against cumulative emissions, one curve per run: series = [{name, rounds}].
export function tradeoffFigure(series) {
  const curves = series.map((s) => ({ name: s.name, points: cumulative(s.rounds).filter((r) => roundAccuracy(r) !== null && roundAccuracy(r) !== undefined) }));
  const maxKg = Math.max(0, ...curves.flatMap((c) => c.points.map((p) => p.cumulative_kg)));
  const [factor, unit] = co2Unit(maxKg);
  const allX = curves.flatMap((c) => c.points.map((p) => p.cumulative_kg));
  const allY = curves.flatMap((c) => c.points.map((p) => roundAccuracy(p)));
  const spanX = Math.max(...allX, 0) - Math.min(...allX, 0) || 1;
  const spanY = Math.max(...allY, 0) - Math.min(...allY, 1) || 1;
  const data = curves.map((curve, i) => {
    // Label a point with its round only when it is clear of the last label (about 1/12 of the chart).
    const labels = [];
    let previous = null;
    curve.points.forEach((p, j) => {
      const here = [p.cumulative_kg / spanX, roundAccuracy(p) / spanY];
      const clear = !previous || Math.hypot(here[0] - previous[0], here[1] - previous[1]) > 0.085;
      const isLast = j === curve.points.length - 1;
      labels.push(clear || (isLast && !labels[j - 1]) ? `r${p.round}` : "");
      if (labels[j]) previous = here;
    });
    const colour = COLORS[i % COLORS.length];
    const labelled = curve.points.filter((p, j) => labels[j]); // a few text labels: cheap to draw
    return [{
      type: "scatter", mode: "lines+markers", name: esc(curve.name), legendgroup: `c${i}`,
      x: curve.points.map((p) => p.cumulative_kg * factor),
      y: curve.points.map((p) => roundAccuracy(p)),
      customdata: curve.points.map((p) => p.round),
      line: { color: colour, width: 2 },
      marker: { size: curve.points.length > 80 ? 4 : 7 },
      hovertemplate: `${esc(curve.name)}<br>round %{customdata}<br>%{x:.3g} ${unit} CO₂e<br>accuracy %{y:.3f}<extra></extra>`,
    }, {
      type: "scatter", mode: "text", legendgroup: `c${i}`, showlegend: false, hoverinfo: "skip",
      x: labelled.map((p) => p.cumulative_kg * factor), y: labelled.map((p) => roundAccuracy(p)),
      text: labelled.map((p) => `r${p.round}`), textposition: "top left", textfont: { size: 10, color: colour },
    }];
  }).flat();
  return {
    data,
    layout: layout({
      xaxis: { title: { text: `cumulative ${unit} CO₂e` }, rangemode: "tozero" },
      yaxis: { title: { text: "accuracy" } },
      showlegend: series.length > 1,
      annotations: curves.some((c) => c.points.length) ? [] : empty("No evaluated round yet"),
    }),
  };
}

// Live power per node over a window: lines = [{node_id, role, t: [ms], w: [W]}], total = {t, w}
// (the sum over every node, when there are too many nodes to draw each).
// A gap in a node's samples (it was idle, paused or away) breaks its line instead of bridging it.
function withGaps(t, w, gapMs = 10_000) {
  const x = [];
  const y = [];
  t.forEach((ms, i) => {
    if (i && ms - t[i - 1] > gapMs) { x.push(plotTime(t[i - 1] + 1)); y.push(null); }
    x.push(plotTime(ms));
    y.push(w[i]);
  });
  return { x, y };
}

export function powerFigure(lines, total, start, end) {
  let colour = 0;
  const data = lines.map((line) => ({
    type: "scatter", mode: "lines+markers", name: esc(line.role === "server" ? `${line.node_id} (FL server)` : line.node_id),
    ...withGaps(line.t, line.w), marker: { size: 3 },
    line: { width: 1.6, color: line.role === "server" ? SERVER_COLOR : COLORS[colour++ % COLORS.length] },
    hovertemplate: `%{fullData.name}<br>%{x|%H:%M:%S} UTC<br>%{y:.3g} W<extra></extra>`,
  }));
  if (total) {
    data.push({
      type: "scatter", mode: "lines", name: "all nodes (right axis)", yaxis: "y2",
      x: total.t.map(plotTime), y: total.w, line: { width: 2, dash: "dot", color: "#1d2b22" },
      hovertemplate: `all nodes<br>%{x|%H:%M:%S} UTC<br>%{y:.4g} W<extra></extra>`,
    });
  }
  return {
    data,
    layout: layout({
      xaxis: { title: { text: "time (UTC)" }, type: "date", range: [plotTime(start), plotTime(end)] },
      yaxis: { title: { text: "W" }, rangemode: "tozero" },
      ...(total ? { yaxis2: { ...AXIS, title: { text: "W, all nodes" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false } } : {}),
      margin: { l: 60, r: total ? 60 : 18, t: 12, b: 48 },
      showlegend: data.length > 1 && !total,
      annotations: data.some((d) => d.x.length) ? [] : empty("No power sample in the last 5 minutes"),
    }),
  };
}


// Where the emissions come from (Green FL's breakdown): the share of each component, of the
// emissions and of the energy, summed over the rounds so far.
export const COMPONENTS = [
  ["compute", "client compute", COLORS[0]],
  ["upload", "upload", COLORS[1]],
  ["download", "download", COLORS[2]],
  ["server", "FL server", "#8a8f96"],
];

export function breakdownFigure(rounds) {
  const sum = (key) => rounds.reduce((total, r) => total + (r[key] || 0), 0);
  const totals = { emissions: sum("emissions_kg"), energy: sum("energy_kwh") };
  const share = (name, what) => {
    const unit = what === "emissions" ? "emissions_kg" : "energy_kwh";
    return totals[what] > 0 ? (100 * sum(`${name}_${unit}`)) / totals[what] : 0;
  };
  return {
    data: COMPONENTS.map(([name, label, color]) => ({
      type: "bar", orientation: "h", name: label, marker: { color },
      y: ["emissions", "energy"],
      x: [share(name, "emissions"), share(name, "energy")],
      hovertemplate: `${label}: %{x:.1f} %% of %{y}<extra></extra>`,
    })),
    layout: layout({
      barmode: "stack",
      xaxis: { title: { text: "share (%)" }, range: [0, 100] },
      legend: { orientation: "h", y: -0.35 },
      annotations: rounds.length ? [] : empty("No round yet"),
    }),
  };
}
