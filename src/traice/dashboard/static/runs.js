// Runs view (#/): every run, a name filter, two ticked runs to compare. Live from the socket.
import { accuracy, co2, energy, esc, utc } from "./format.js";
import { $, api, patchRows, throttle } from "./lib.js";

export function runsView(root) {
  root.innerHTML = `
    <section class="toolbar">
      <h2>Runs</h2>
      <label class="search"><span class="sr-only">Filter runs by name</span>
        <input id="search" type="search" placeholder="Filter by name…" autocomplete="off" spellcheck="false"></label>
      <span id="runs-count" class="muted"></span>
      <span class="spacer"></span>
      <span id="compare-hint" class="muted">Tick two runs to compare them</span>
      <button id="compare-btn" type="button" class="primary" disabled aria-label="Compare the two ticked runs">Compare</button>
    </section>
    <p id="runs-error" class="error" role="alert" hidden></p>
    <div class="table-wrap">
      <table id="runs" class="data">
        <thead><tr>
          <th class="check"><span class="sr-only">Compare</span></th><th class="text">Run</th><th class="text">Status</th>
          <th>Clients (online / total)</th><th>Rounds</th><th>Energy</th><th>Emissions (CO₂e)</th><th>Accuracy</th><th>Started (UTC)</th>
        </tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <p class="note">Data: <a href="/api/runs">/api/runs</a> · API docs: <a href="/docs">/docs</a></p>`;

  const search = $("#search", root);
  const body = $("#runs tbody", root);
  const compare = $("#compare-btn", root);
  let runs = null;
  let picked = []; // run ids, in the order they were ticked (at most two)

  function render() {
    if (runs === null) return;
    const query = search.value.trim().toLowerCase();
    const shown = runs.filter((r) => !query || r.name.toLowerCase().includes(query) || `#${r.id}` === query);
    $("#runs-count", root).textContent = query ? `${shown.length} of ${runs.length}` : "";
    if (!shown.length) {
      const text = runs.length
        ? `No run matches “${esc(search.value.trim())}”.`
        : "No runs yet. Start one with <code>traice demo</code>, or track your own training with the TRAICE client.";
      patchRows(body, [{ key: "empty", html: `<tr><td colspan="9" class="empty">${text}</td></tr>` }]);
    } else {
      patchRows(body, shown.map((r) => ({ key: `r${r.id}`, html: row(r) })));
      for (const box of body.querySelectorAll("input.pick")) box.checked = picked.includes(Number(box.closest("tr").dataset.run));
    }
    compare.disabled = picked.length !== 2;
    $("#compare-hint", root).textContent = picked.length === 2 ? "" : `Tick two runs to compare them (${picked.length}/2)`;
  }

  async function load() {
    try {
      runs = await api("/api/runs");
      $("#runs-error", root).hidden = true;
      picked = picked.filter((id) => runs.some((r) => r.id === id));
    } catch (error) {
      const el = $("#runs-error", root);
      el.textContent = `Could not load runs: ${error.message}`;
      el.hidden = false;
    }
    render();
  }
  const refresh = throttle(load, 500);

  search.addEventListener("input", render);
  body.addEventListener("change", (event) => {
    const box = event.target.closest("input.pick");
    if (!box) return;
    const id = Number(box.closest("tr").dataset.run);
    picked = picked.filter((x) => x !== id);
    if (box.checked) picked.push(id);
    if (picked.length > 2) picked = picked.slice(-2); // the oldest tick gives way
    render();
  });
  body.addEventListener("click", (event) => {
    if (event.target.closest("input, a, button, label")) return;
    const tr = event.target.closest("tr[data-run]");
    if (tr) location.hash = `#/runs/${tr.dataset.run}`;
  });
  body.addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr[data-run]");
    if (tr && event.target === tr && event.key === "Enter") location.hash = `#/runs/${tr.dataset.run}`;
  });
  compare.addEventListener("click", () => {
    if (picked.length === 2) location.hash = `#/compare/${picked[0]}/${picked[1]}`;
  });

  load();
  document.title = "TRAICE — runs";
  return {
    onEvent(message) {
      if (message.type !== "sample") refresh(); // samples do not change the totals shown here
    },
    destroy() { refresh.cancel(); },
  };
}

function row(r) {
  const rounds = r.rounds_planned ? `${r.rounds} / ${r.rounds_planned}` : `${r.rounds}`;
  return `<tr data-run="${r.id}" class="clickable" tabindex="0">
    <td class="check"><input type="checkbox" class="pick" aria-label="Select run ${esc(r.name)} (#${r.id}) for comparison"></td>
    <td class="text"><a href="#/runs/${r.id}">${esc(r.name)}</a> <small class="muted">#${r.id}</small></td>
    <td class="text"><span class="status status-${esc(r.status)}">${esc(r.status)}</span></td>
    <td>${r.clients_online} / ${r.clients}</td>
    <td>${rounds}</td>
    <td>${energy(r.energy_kwh)}</td>
    <td>${co2(r.emissions_kg)}</td>
    <td>${accuracy(r.accuracy)}</td>
    <td>${utc(r.started_at)}</td>
  </tr>`;
}
