// Client and round tables of a run: paginated, live, with CSV / JSON exports.
import { accuracy, bytes, co2, energy, esc, seconds, sig, utc } from "./format.js";
import { $, api, pager, patchRows } from "./lib.js";
import { showError } from "./run-control.js";

const ACTIVE = ["running", "paused", "stopping"];
const CLIENTS_PAGE = 50;
const ROUNDS_PAGE = 25;
const DETAIL_ROWS = 100; // newest rounds shown when a client is expanded
const byNode = (a, b) => a.node_id.localeCompare(b.node_id, "en", { numeric: true });

function hardware(h) {
  if (!h) return { text: "–", title: "" };
  const cpu = h.cpu_model ? `${h.cpu_model}${h.cpu_count ? ` ×${h.cpu_count}` : ""}` : "–";
  const gpu = h.gpu_model ? ` · ${h.gpu_model}${h.gpu_count > 1 ? ` ×${h.gpu_count}` : ""}` : "";
  const title = [h.os, h.python && `Python ${h.python}`, h.ram_gb && `${sig(h.ram_gb)} GB RAM`, h.cpu_power_method && `CPU power: ${h.cpu_power_method}`]
    .filter(Boolean).join(" · ");
  return { text: cpu + gpu, title };
}

function place(c) {
  const where = [c.country_iso_code, c.region].filter(Boolean).join(" / ") || "–";
  return `${esc(where)}${c.intensity_g_per_kwh !== null && c.intensity_g_per_kwh !== undefined ? ` <small class="muted">${sig(c.intensity_g_per_kwh)} g/kWh</small>` : ""}`;
}

const statusOf = (c) => (c.excluded && c.status !== "finished" ? "excluded" : c.status);

// Cells shared by the FL server and client rows.
function cells(c) {
  const hw = hardware(c.hardware);
  const status = statusOf(c);
  return `<td class="text">${place(c)}</td>
    <td class="text hw" title="${esc(hw.title)}">${esc(hw.text)}</td>
    <td class="text"><span class="cstatus cstatus-${esc(status)}">${esc(status)}</span></td>
    <td>${energy(c.energy_kwh)}</td><td>${co2(c.emissions_kg)}</td><td>${esc(c.rounds)}</td>
    <td>${accuracy(c.last_accuracy)}</td><td title="${esc(c.last_seen)}">${esc(utc(c.last_seen))}</td>`;
}

export function clientsTable(el, ctx) {
  el.innerHTML = `
    <div class="panel-head"><h3>Clients</h3><span id="clients-summary" class="muted"></span><span class="spacer"></span>
      <label><span class="sr-only">Filter clients</span>
        <input id="client-filter" type="search" placeholder="Filter by node, country, status…" autocomplete="off" spellcheck="false"></label>
    </div>
    <div id="fl-server-box" hidden>
      <h4>FL server <span class="muted">(Flower strategy: aggregates, evaluates the global model)</span></h4>
      <div class="table-wrap"><table id="fl-server" class="data compact">
        <thead><tr><th class="text">Node</th><th class="text">Country</th><th class="text">Hardware</th><th class="text">Status</th>
          <th>Energy</th><th>Emissions</th><th>Rounds</th><th>Last accuracy</th><th>Last seen (UTC)</th></tr></thead>
        <tbody></tbody></table></div>
    </div>
    <p id="clients-error" class="error" role="alert" hidden></p>
    <div class="table-wrap"><table id="clients" class="data">
      <thead><tr><th class="text">Node</th><th class="text">Country</th><th class="text">Hardware</th><th class="text">Status</th>
        <th>Energy</th><th>Emissions (CO₂e)</th><th>Rounds</th><th>Last accuracy</th><th>Last seen (UTC)</th><th><span class="sr-only">Action</span></th></tr></thead>
      <tbody></tbody></table></div>
    <div id="clients-pager" class="pager"></div>`;

  const body = $("#clients tbody", el);
  const filter = $("#client-filter", el);
  const error = $("#clients-error", el);
  const expanded = new Set();
  const details = new Map(); // node_id -> {rows} | {error} | {loading}
  let page = 0;

  function render() {
    const { run, clients } = ctx.state;
    const servers = clients.filter((c) => c.role === "server").sort(byNode);
    const workers = clients.filter((c) => c.role !== "server").sort(byNode);
    $("#fl-server-box", el).hidden = !servers.length;
    patchRows($("#fl-server tbody", el), servers.map((c) => ({
      key: `s:${c.node_id}`, html: `<tr data-node="${esc(c.node_id)}"><td class="text"><b>${esc(c.node_id)}</b></td>${cells(c)}</tr>`,
    })));

    const query = filter.value.trim().toLowerCase();
    const shown = !query ? workers : workers.filter((c) =>
      [c.node_id, c.country_iso_code, c.region, statusOf(c), c.hardware && c.hardware.cpu_model, c.hardware && c.hardware.gpu_model]
        .some((v) => v && String(v).toLowerCase().includes(query)));
    const count = (s) => workers.filter((c) => statusOf(c) === s).length;
    const parts = [`${workers.length.toLocaleString("en")} client${workers.length === 1 ? "" : "s"}`, `${count("online").toLocaleString("en")} online`];
    for (const s of ["paused", "excluded", "offline", "finished"]) if (count(s)) parts.push(`${count(s).toLocaleString("en")} ${s}`);
    $("#clients-summary", el).textContent = parts.join(" · ");

    page = pager($("#clients-pager", el), { page, size: CLIENTS_PAGE, total: shown.length, label: "clients" }, (p) => { page = p; render(); });
    const rows = [];
    const canControl = ctx.state.has("/api/runs/{}/clients/{}/control") && run && ACTIVE.includes(run.status);
    for (const c of shown.slice(page * CLIENTS_PAGE, (page + 1) * CLIENTS_PAGE)) {
      rows.push({ key: `n:${c.node_id}`, html: clientRow(c, expanded.has(c.node_id), canControl) });
      if (expanded.has(c.node_id)) rows.push({ key: `d:${c.node_id}`, html: detailRow(c.node_id, details.get(c.node_id)) });
    }
    if (!rows.length) {
      const text = workers.length ? "No client matches the filter." : "No client has reported yet.";
      rows.push({ key: "empty", html: `<tr><td colspan="10" class="empty">${text}</td></tr>` });
    }
    patchRows(body, rows);
  }

  async function loadDetail(node) {
    const perNode = ctx.state.perNode;
    if (perNode && perNode.everyone) { // already here for the energy chart
      details.set(node, { rows: perNode.rows.filter((r) => r.node_id === node) });
      return;
    }
    if (!ctx.state.has("/api/runs/{}/rounds/clients")) {
      details.set(node, { error: "Per-client rounds are not available on this TRAICE server." });
      return;
    }
    try {
      const rows = await api(`${ctx.base}/rounds/clients?node_id=${encodeURIComponent(node)}`);
      details.set(node, { rows: rows.filter((r) => r.node_id === node) });
    } catch (failure) {
      details.set(node, { error: `Could not load the rounds of ${node}: ${failure.message}` });
    }
  }

  async function toggle(node) {
    if (expanded.has(node)) {
      expanded.delete(node);
      details.delete(node);
      render();
      return;
    }
    expanded.add(node);
    details.set(node, { loading: true });
    render();
    await loadDetail(node);
    if (expanded.has(node)) render();
  }

  async function refreshDetails() {
    await Promise.all([...expanded].map(loadDetail));
    render();
  }

  async function control(node, action, button) {
    button.disabled = true;
    showError(error, null);
    try {
      const command = await api(`${ctx.base}/clients/${encodeURIComponent(node)}/control`, { method: "POST", body: { action } });
      if (command) ctx.upsertCommand(command);
      const client = ctx.state.clients.find((c) => c.node_id === node);
      if (client) { // shown at once; the server's own record follows
        client.excluded = action === "exclude";
        if (action === "exclude" && client.status !== "finished") client.status = "excluded";
        if (action === "include" && client.status === "excluded") client.status = "online";
      }
      render();
      ctx.reloadClients();
    } catch (failure) {
      showError(error, failure);
      button.disabled = false;
    }
  }

  filter.addEventListener("input", () => { page = 0; render(); });
  body.addEventListener("click", (event) => {
    const action = event.target.closest("button.btn-exclude, button.btn-include");
    const tr = event.target.closest("tr[data-node]");
    if (action && tr) {
      control(tr.dataset.node, action.classList.contains("btn-exclude") ? "exclude" : "include", action);
      return;
    }
    if (event.target.closest("a, input, tr.detail")) return;
    if (tr) toggle(tr.dataset.node);
  });
  body.addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr[data-node]");
    if (tr && event.target === tr && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      toggle(tr.dataset.node);
    }
  });

  return { render, refreshDetails };
}

function clientRow(c, open, canControl) {
  const excluded = c.excluded || c.status === "excluded";
  const disabled = !canControl || c.status === "finished";
  const verb = excluded ? "Include" : "Exclude";
  const button = `<button type="button" class="${excluded ? "btn-include" : "btn-exclude"} small" ${disabled ? "disabled" : ""}
    aria-label="${verb} client ${esc(c.node_id)} ${excluded ? "in" : "from"} the next rounds">${verb}</button>`;
  return `<tr data-node="${esc(c.node_id)}" class="clickable${open ? " open" : ""}" tabindex="0" aria-expanded="${open}"
      title="Show or hide the rounds of ${esc(c.node_id)}">
    <td class="text"><span class="caret" aria-hidden="true">${open ? "▾" : "▸"}</span> ${esc(c.node_id)}</td>${cells(c)}<td>${button}</td></tr>`;
}

function detailRow(node, detail) {
  let inner;
  if (!detail || detail.loading) inner = `<p class="muted">Loading the rounds of ${esc(node)}…</p>`;
  else if (detail.error) inner = `<p class="muted">${esc(detail.error)}</p>`;
  else if (!detail.rows.length) inner = `<p class="muted">${esc(node)} has not reported a round yet.</p>`;
  else {
    const rows = [...detail.rows].sort((a, b) => b.round - a.round);
    const more = rows.length > DETAIL_ROWS ? `<p class="muted">Newest ${DETAIL_ROWS} of ${rows.length} rounds.</p>` : "";
    inner = `<div class="detail-scroll"><table class="mini" aria-label="Rounds of ${esc(node)}">
      <thead><tr><th>Round</th><th>Energy</th><th>Emissions</th><th>Duration</th><th>Accuracy</th><th>Loss</th><th>Examples</th></tr></thead>
      <tbody>${rows.slice(0, DETAIL_ROWS).map((r) => `<tr><td>${esc(r.round)}</td><td>${energy(r.energy_kwh)}</td><td>${co2(r.emissions_kg)}</td>
        <td>${seconds(r.duration_s)}</td><td>${accuracy(r.accuracy)}</td><td>${sig(r.loss)}</td><td>${esc(r.num_examples ?? "–")}</td></tr>`).join("")}</tbody>
      </table></div>${more}`;
  }
  return `<tr class="detail" data-detail="${esc(node)}"><td colspan="10">${inner}</td></tr>`;
}

export function roundsTable(el, ctx) {
  const base = ctx.base;
  const link = (table, kind, extra = "") => `<a href="${base}/${table}.${kind}${extra}" download>${kind.toUpperCase()}</a>`;
  el.innerHTML = `
    <div class="panel-head"><h3>Rounds</h3><span id="rounds-summary" class="muted"></span><span class="spacer"></span>
      <span class="exports">Export:
        rounds ${link("rounds", "csv")} ${link("rounds", "json")} ·
        clients ${link("clients", "csv")} ${link("clients", "json")} ·
        samples ${link("samples", "csv", "?limit=100000")} ${link("samples", "json", "?limit=100000")}</span>
    </div>
    <div class="table-wrap"><table id="rounds" class="data">
      <thead><tr><th>Round</th><th>Clients</th><th>Duration</th><th>Energy</th><th>Emissions (CO₂e)</th>
        <th>Accuracy (clients)</th><th>Accuracy (global)</th><th>Loss (clients)</th><th>Data ↑ / ↓</th><th>Ended (UTC)</th></tr></thead>
      <tbody></tbody></table></div>
    <div id="rounds-pager" class="pager"></div>`;
  let page = 0;

  function render() {
    const rounds = [...ctx.state.rounds].sort((a, b) => b.round - a.round);
    $("#rounds-summary", el).textContent = rounds.length ? `${rounds.length.toLocaleString("en")} rounds, newest first` : "";
    page = pager($("#rounds-pager", el), { page, size: ROUNDS_PAGE, total: rounds.length, label: "rounds" }, (p) => { page = p; render(); });
    const rows = rounds.slice(page * ROUNDS_PAGE, (page + 1) * ROUNDS_PAGE).map((r) => ({
      key: `r${r.round}`,
      html: `<tr data-round="${esc(r.round)}"><td>${esc(r.round)}</td><td>${esc(r.clients)}</td><td>${seconds(r.duration_s)}</td>
        <td>${energy(r.energy_kwh)}</td><td>${co2(r.emissions_kg)}</td><td>${accuracy(r.accuracy)}</td><td>${accuracy(r.server_accuracy)}</td>
        <td>${sig(r.loss)}</td><td>${bytes(r.bytes_up)} / ${bytes(r.bytes_down)}</td><td>${esc(utc(r.ended_at))}</td></tr>`,
    }));
    if (!rows.length) rows.push({ key: "empty", html: `<tr><td colspan="10" class="empty">No round yet.</td></tr>` });
    patchRows($("#rounds tbody", el), rows);
  }
  return { render };
}
