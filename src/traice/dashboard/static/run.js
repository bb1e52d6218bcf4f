// Run view (#/runs/{id}): headline figures, charts, control, alerts, clients and rounds, live.
import { breakdownFigure, draw, emissionsFigure, energyFigure, loadPlotly, powerFigure, purge, showMissing, tradeoffFigure } from "./charts.js";
import { accuracy, co2, energy, ms, power, roundAccuracy, sig, utc } from "./format.js";
import { $, api, features, throttle } from "./lib.js";
import { PowerWindow } from "./power.js";
import { alertsPanel } from "./run-alerts.js";
import { controlBar } from "./run-control.js";
import { clientsTable, roundsTable } from "./run-tables.js";

export const ACTIVE = ["running", "paused", "stopping"];
const WINDOW_MS = 5 * 60 * 1000; // live power shown (and kept) per node
const STACKED = 8; // nodes drawn on their own in the energy chart; the others are summed
const LINES = 8; // nodes drawn on their own in the power chart, when there are many
const CHARTS = ["emissions", "energy", "tradeoff", "power", "breakdown"];

export function runView(root, id) {
  root.innerHTML = skeleton(id);
  const state = {
    id, run: null, rounds: [], clients: [], perNode: null, commands: [], rules: null, forecast: null,
    power: new PowerWindow(WINDOW_MS), has: () => false,
  };
  const base = `/api/runs/${id}`;
  let stopped = false;
  const ctx = { id, base, state, reloadRun: () => refreshSummary(), reloadClients: () => refreshClients() };
  const control = controlBar($("#control", root), $("#commands-panel", root), ctx);
  const alerts = alertsPanel($("#alerts", root), ctx);
  const clients = clientsTable($("#clients-panel", root), ctx);
  const rounds = roundsTable($("#rounds-panel", root), ctx);

  // ------------------------------------------------------------ loading
  const showError = (error) => {
    const el = $("#run-error", root);
    el.hidden = !error;
    if (error) el.textContent = `Could not load everything: ${error.message}. Retrying on the next update.`;
  };

  async function loadRun() {
    state.run = await api(base);
    renderHead();
    control.render();
  }
  async function loadRounds() {
    state.rounds = await api(`${base}/rounds`);
    rounds.render();
    renderHead();
    redraw("emissions", "energy", "tradeoff", "breakdown");
  }
  async function loadClients() {
    state.clients = await api(`${base}/clients`);
    clients.render();
  }
  async function loadPerNode() {
    if (!state.has("/api/runs/{}/rounds/clients")) { state.perNode = null; return; }
    const nodes = [...state.clients].sort((a, b) => (b.energy_kwh || 0) - (a.energy_kwh || 0));
    const everyone = nodes.length <= STACKED + 2;
    const shown = everyone ? nodes : nodes.slice(0, STACKED);
    const rows = everyone
      ? await api(`${base}/rounds/clients`)
      : (await Promise.all(shown.map((n) => api(`${base}/rounds/clients?node_id=${encodeURIComponent(n.node_id)}`)))).flat();
    shown.sort((a, b) => (a.role === "server" ? -1 : b.role === "server" ? 1 : a.node_id.localeCompare(b.node_id, "en", { numeric: true })));
    state.perNode = { nodes: shown.map((n) => ({ node_id: n.node_id, role: n.role })), rows, others: nodes.length - shown.length, everyone };
    redraw("energy");
    clients.refreshDetails();
  }
  async function loadCommands() {
    if (!state.has("/api/runs/{}/commands")) return;
    state.commands = await api(`${base}/commands`);
    control.render();
  }
  async function loadRules() {
    state.rules = state.has("/api/runs/{}/rules") ? await api(`${base}/rules`) : null;
    alerts.render();
  }
  async function loadForecast() {
    if (!state.has("/api/runs/{}/forecast")) return;
    try {
      state.forecast = await api(`${base}/forecast`);
    } catch {
      state.forecast = null; // not enough rounds yet, or no forecast for this run
    }
    renderHead();
  }
  async function loadSamples() {
    const end = windowEnd();
    const url = (fromMs) => `${base}/samples?since=${Math.floor(fromMs / 1000)}&limit=10000`;
    let rows = await api(url(end - WINDOW_MS));
    if (rows.length >= 10000) rows = await api(url(end - 30_000)); // very many nodes: the last 30 s
    for (const s of rows) state.power.add(s.node_id, ms(s.t), s.power_w);
    powerTick();
  }

  async function loadAll() {
    try {
      state.has = await features();
      await loadRun();
    } catch (error) {
      if (error.status === 404) return notFound();
      showError(error);
      return;
    }
    const results = await Promise.allSettled([loadRounds(), loadClients(), loadCommands(), loadRules(), loadSamples()]);
    const more = await Promise.allSettled([loadPerNode(), loadForecast()]);
    const failed = [...results, ...more].find((r) => r.status === "rejected");
    showError(failed ? failed.reason : null);
  }

  function notFound() {
    if (stopped) return;
    root.innerHTML = `<nav class="crumbs"><a href="#/">← All runs</a></nav>
      <p class="empty-page">Run #${id} does not exist. <a href="#/">Back to the runs</a>.</p>`;
    stopped = true;
  }

  // Live refreshes from REST, throttled: totals often, the (bigger) client list less often.
  const refreshSummary = throttle(async () => {
    try {
      await Promise.all([loadRun(), loadRounds()]);
      await loadForecast();
      showError(null);
    } catch (error) { showError(error); }
  }, 1000);
  const refreshClients = throttle(async () => {
    try {
      await loadClients();
      await loadPerNode();
      showError(null);
    } catch (error) { showError(error); }
  }, 2500);
  const powerTick = throttle(() => { renderPower(); redraw("power"); }, 1000); // samples come about once a second

  // ------------------------------------------------------------ rendering
  function renderHead() {
    const run = state.run;
    if (!run) return;
    document.title = `TRAICE — ${run.name}`;
    $("#run-title", root).textContent = run.name;
    const status = $("#run-status", root);
    status.textContent = run.status;
    status.className = `status status-${run.status}`;
    $("#run-meta", root).textContent = `#${run.id} · started ${utc(run.started_at)} UTC${run.ended_at ? ` · ended ${utc(run.ended_at)} UTC` : ""}`;

    kpi("emissions", co2(run.emissions_kg), "CO₂e so far");
    kpi("energy", energy(run.energy_kwh), "all nodes, incl. FL server");
    const last = [...state.rounds].reverse().find((r) => roundAccuracy(r) !== null && roundAccuracy(r) !== undefined);
    const global = last && last.server_accuracy !== null && last.server_accuracy !== undefined;
    kpi("accuracy", accuracy(last ? roundAccuracy(last) : run.accuracy),
      last ? `${global ? "global model" : "clients' evaluation"}, round ${last.round}` : "no evaluation yet");
    kpi("round", run.rounds_planned ? `${run.rounds} / ${run.rounds_planned}` : `${run.rounds}`, run.rounds_planned ? "rounds done / planned" : "rounds done");
    kpi("clients", `${run.clients_online} / ${run.clients}`, "online / total");
    renderPower();

    const forecast = state.forecast;
    const card = $("#kpi-forecast", root).closest(".kpi");
    card.hidden = !(forecast && forecast.emissions_kg_at_end !== undefined && forecast.emissions_kg_at_end !== null);
    if (!card.hidden) {
      const err = Number(forecast.expected_error);
      const margin = Number.isFinite(err) && err > 0 ? `± ${err <= 1 ? `${sig(err * 100, 2)} %` : sig(err)} · ` : "";
      const kwh = forecast.energy_kwh_at_end !== undefined && forecast.energy_kwh_at_end !== null ? `${energy(forecast.energy_kwh_at_end)} ` : "";
      kpi("forecast", co2(forecast.emissions_kg_at_end), `${margin}${kwh}at the end of the run`);
    }
  }

  function kpi(name, value, note) {
    const el = $(`#kpi-${name}`, root);
    if (el.textContent !== value) el.textContent = value;
    const sub = el.parentElement.querySelector(".note");
    if (sub && sub.textContent !== note) sub.textContent = note;
  }

  function renderPower() {
    const watts = state.power.current(Date.now(), 30_000);
    const over = state.run && !ACTIVE.includes(state.run.status);
    kpi("power", watts === null ? "–" : power(watts), watts !== null ? "now, all nodes" : over ? "the run has ended" : "no sample in the last 30 s");
  }

  // The power chart shows the last 5 minutes of a live run, or the last 5 of a finished one.
  function windowEnd() {
    const run = state.run;
    if (!run || ACTIVE.includes(run.status)) return Date.now();
    return state.power.latestMs || ms(run.ended_at) || Date.now();
  }

  function powerChart() {
    const end = windowEnd();
    const started = state.run ? ms(state.run.started_at) : NaN;
    const start = Math.max(end - WINDOW_MS, Number.isFinite(started) ? started - 5000 : 0); // a short run fills the chart
    const roles = new Map(state.clients.map((c) => [c.node_id, c.role]));
    let { lines, count } = state.power.lines(start, LINES + 2);
    let total = null;
    if (count > LINES + 2) {
      lines = lines.slice(0, LINES);
      total = state.power.total(start, end);
    }
    const caption = $("#chart-power", root).parentElement.querySelector("figcaption .muted");
    caption.textContent = total
      ? `the ${LINES} highest of ${count.toLocaleString("en")} nodes, and all nodes (dotted, right axis)`
      : "per node, last 5 minutes";
    return powerFigure(lines.map((l) => ({ ...l, role: roles.get(l.node_id) })), total, start, end);
  }

  const figures = {
    emissions: () => emissionsFigure(state.rounds),
    energy: () => energyFigure(state.rounds, state.perNode),
    tradeoff: () => tradeoffFigure([{ name: state.run ? state.run.name : "", rounds: state.rounds }]),
    power: powerChart,
    breakdown: () => breakdownFigure(state.rounds),
  };
  const dirty = new Set();
  let plotly = false;
  const flushCharts = throttle(async () => {
    if (!plotly) return;
    const names = [...dirty];
    dirty.clear();
    for (const name of names) await draw($(`#chart-${name}`, root), figures[name]());
  }, 400); // Plotly.react at most ~2.5 times a second
  function redraw(...names) {
    names.forEach((n) => dirty.add(n));
    flushCharts();
  }
  loadPlotly()
    .then(() => { plotly = true; redraw(...CHARTS); })
    .catch(() => CHARTS.forEach((n) => showMissing($(`#chart-${n}`, root))));

  // ------------------------------------------------------------ live events
  const renderClients = throttle(() => clients.render(), 250); // a thousand status events = one redraw
  function mergeClient(data) {
    const known = state.clients.find((c) => c.node_id === data.node_id);
    if (!known) return refreshClients(); // a new node: its full record comes from REST
    Object.assign(known, data);
    renderClients();
  }

  const RANK = { requested: 0, acknowledged: 1, done: 2, failed: 2 };
  function upsertCommand(command) {
    const i = state.commands.findIndex((c) => c.id === command.id);
    if (i < 0) state.commands.unshift(command);
    else if ((RANK[command.status] ?? 0) >= (RANK[state.commands[i].status] ?? 0)) state.commands[i] = { ...state.commands[i], ...command };
    // else: a stale copy (the POST answer can arrive after the socket said "done"): keep the newer
    state.commands.sort((a, b) => b.id - a.id);
    control.render();
  }
  ctx.upsertCommand = upsertCommand;

  const ticker = setInterval(() => { // slide the live window, let "current power" age out
    if (state.run && ACTIVE.includes(state.run.status)) powerTick();
    else renderPower();
  }, 2000);

  loadAll();
  return {
    onEvent(message) {
      if (stopped) return;
      if (message.type === "reconnected") { loadAll(); return; }
      if (Number(message.run_id) !== id) return;
      const data = message.data || {};
      switch (message.type) {
        case "sample":
          state.power.add(data.node_id, ms(data.t), data.power_w ?? (data.cpu_w || 0) + (data.gpu_w || 0) + (data.ram_w || 0));
          powerTick();
          break;
        case "round":
          refreshSummary();
          refreshClients();
          break;
        case "client":
          mergeClient(data);
          refreshSummary();
          break;
        case "run":
          if (state.run && data.status) state.run.status = data.status;
          renderHead();
          control.render();
          renderClients();
          refreshSummary();
          break;
        case "command":
          upsertCommand(data);
          if (data.node_id) refreshClients(); else refreshSummary();
          break;
        case "alert":
          alerts.upsert(data);
          break;
        case "rule":
          if (data.deleted) alerts.remove(data.id); else alerts.upsert(data);
          break;
        default:
      }
    },
    destroy() {
      stopped = true;
      clearInterval(ticker);
      [refreshSummary, refreshClients, powerTick, flushCharts, renderClients].forEach((t) => t.cancel());
      CHARTS.forEach((n) => purge($(`#chart-${n}`, root)));
    },
  };
}

function skeleton(id) {
  const card = (name, label) => `<div class="kpi"><span class="label">${label}</span><span class="value" id="kpi-${name}">–</span><span class="note"></span></div>`;
  const chart = (name, title, help) => `<figure class="chart"><figcaption>${title} <span class="muted">${help}</span></figcaption>
    <div id="chart-${name}" class="plot" role="img" aria-label="${title}"></div></figure>`;
  return `
    <nav class="crumbs"><a href="#/">← All runs</a></nav>
    <section class="run-head">
      <div class="titles">
        <h2><span id="run-title">Run #${id}</span> <span id="run-status" class="status">…</span></h2>
        <div id="run-meta" class="muted"></div>
      </div>
      <div id="control"></div>
    </section>
    <section id="commands-panel" class="commands-panel" aria-label="Commands" hidden></section>
    <p id="run-error" class="error" role="alert" hidden></p>
    <section class="kpis" aria-label="Headline figures">
      ${card("emissions", "Emissions")}${card("energy", "Energy")}${card("accuracy", "Accuracy")}
      ${card("round", "Round")}${card("clients", "Clients")}${card("power", "Power")}${card("forecast", "Forecast")}
    </section>
    <section class="charts">
      ${chart("emissions", "Cumulative emissions", "over time, per round")}
      ${chart("energy", "Energy per round", "stacked by node")}
      ${chart("tradeoff", "Accuracy vs. emissions", "labels: round")}
      ${chart("power", "Live power", "per node, last 5 minutes")}
      ${chart("breakdown", "Where the emissions come from", "client compute, upload, download, FL server (Green FL's breakdown)")}
    </section>
    <section id="alerts" class="panel" aria-label="Alerts"></section>
    <section id="clients-panel" class="panel" aria-label="Clients"></section>
    <section id="rounds-panel" class="panel" aria-label="Rounds"></section>`;
}

