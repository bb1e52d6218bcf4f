// Compare view (#/compare/{a}/{b}): both runs' accuracy against cumulative emissions, and totals.
import { draw, loadPlotly, purge, showMissing, tradeoffFigure } from "./charts.js";
import { accuracy, co2, energy, esc, roundAccuracy, sig } from "./format.js";
import { $, api, throttle } from "./lib.js";

export function compareView(root, a, b) {
  root.innerHTML = `
    <nav class="crumbs"><a href="#/">← All runs</a></nav>
    <section class="run-head"><div class="titles"><h2>Compare runs <span id="compare-names" class="muted"></span></h2></div></section>
    <p id="compare-error" class="error" role="alert" hidden></p>
    <figure class="chart wide"><figcaption>Accuracy vs. cumulative emissions <span class="muted">labels: round</span></figcaption>
      <div id="compare-chart" class="plot" role="img" aria-label="Accuracy against cumulative emissions of both runs"></div></figure>
    <section class="panel">
      <div class="table-wrap"><table id="compare-table" class="data">
        <thead><tr><th class="text">Run</th><th class="text">Status</th><th>Rounds</th><th>Clients</th><th>Energy</th>
          <th>Emissions (CO₂e)</th><th>Final accuracy</th><th>CO₂e per round</th></tr></thead>
        <tbody></tbody></table></div>
      <p id="compare-note" class="muted"></p>
    </section>`;
  const ids = [a, b];
  let runs = [];
  let plotly = false;

  async function load() {
    try {
      runs = await Promise.all(ids.map(async (id) => {
        const [run, rounds] = await Promise.all([api(`/api/runs/${id}`), api(`/api/runs/${id}/rounds`)]);
        return { run, rounds };
      }));
      $("#compare-error", root).hidden = true;
    } catch (error) {
      const el = $("#compare-error", root);
      el.textContent = error.status === 404 ? `${error.message}. Pick two existing runs on the runs page.` : `Could not load the runs: ${error.message}`;
      el.hidden = false;
      return;
    }
    render();
  }

  function render() {
    document.title = `TRAICE — compare ${runs.map((r) => r.run.name).join(" / ")}`;
    $("#compare-names", root).textContent = runs.map((r) => `${r.run.name} (#${r.run.id})`).join(" vs. ");
    $("#compare-table tbody", root).innerHTML = runs.map(({ run, rounds }) => {
      const last = [...rounds].sort((x, y) => x.round - y.round).reverse().find((r) => roundAccuracy(r) !== null && roundAccuracy(r) !== undefined);
      const final = last ? roundAccuracy(last) : run.accuracy;
      return `<tr data-run="${run.id}"><td class="text"><a href="#/runs/${run.id}">${esc(run.name)}</a> <small class="muted">#${run.id}</small></td>
        <td class="text"><span class="status status-${esc(run.status)}">${esc(run.status)}</span></td>
        <td>${run.rounds_planned ? `${run.rounds} / ${run.rounds_planned}` : run.rounds}</td><td>${esc(run.clients)}</td>
        <td>${energy(run.energy_kwh)}</td><td>${co2(run.emissions_kg)}</td><td>${accuracy(final)}</td>
        <td>${run.rounds ? co2(run.emissions_kg / run.rounds) : "–"}</td></tr>`;
    }).join("");
    const [x, y] = runs.map((r) => r.run);
    $("#compare-note", root).textContent = x.emissions_kg > 0 && y.emissions_kg > 0
      ? `${y.name} emitted ${sig(y.emissions_kg / x.emissions_kg)}× the CO₂e of ${x.name} (energy ×${sig(y.energy_kwh / (x.energy_kwh || NaN))}).`
      : "";
    if (plotly) draw($("#compare-chart", root), tradeoffFigure(runs.map((r) => ({ name: `${r.run.name} (#${r.run.id})`, rounds: r.rounds }))));
  }

  loadPlotly()
    .then(() => { plotly = true; if (runs.length) render(); })
    .catch(() => showMissing($("#compare-chart", root)));
  const refresh = throttle(load, 1500);
  load();
  return {
    onEvent(message) {
      if (message.type === "reconnected") refresh();
      else if ((message.type === "round" || message.type === "run") && ids.includes(Number(message.run_id))) refresh();
    },
    destroy() { refresh.cancel(); purge($("#compare-chart", root)); },
  };
}
