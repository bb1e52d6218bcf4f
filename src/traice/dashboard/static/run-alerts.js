// Alerts panel of a run: its rules (fired or armed), a form to add one, delete buttons.
import { describeRule, esc, ruleValue, utc } from "./format.js";
import { $, api, patchRows } from "./lib.js";
import { showError } from "./run-control.js";

const UNITS = {
  emissions_kg_over: ["kg CO₂e", "0.001"],
  power_w_over: ["W", "50"],
  accuracy_gain_per_100g_below: ["accuracy per 100 g CO₂e", "0.01"],
};
const THEN = { none: "alert only", pause: "then pause the run", stop: "then stop the run" };

export function alertsPanel(el, ctx) {
  el.innerHTML = `
    <div class="panel-head"><h3>Alerts</h3><span id="rules-summary" class="muted"></span></div>
    <p id="rules-unavailable" class="muted" hidden>Alert rules are not available on this TRAICE server.</p>
    <ul id="rules" class="rules" aria-label="Alert rules"></ul>
    <form id="rule-form" class="rule-form" hidden>
      <label>When
        <select id="rule-kind" name="kind">
          <option value="emissions_kg_over">emissions exceed</option>
          <option value="power_w_over">power of all nodes exceeds</option>
          <option value="accuracy_gain_per_100g_below">accuracy gain per 100 g CO₂e falls below</option>
        </select></label>
      <label><span class="sr-only">Threshold</span>
        <input id="rule-threshold" name="threshold" type="number" step="any" min="0" required inputmode="decimal"></label>
      <span id="rule-unit" class="unit"></span>
      <label id="rule-window-label" hidden>over the last
        <input id="rule-window" name="window_rounds" type="number" min="1" step="1" value="5"> rounds</label>
      <label>level
        <select id="rule-level" name="level"><option>info</option><option selected>warning</option><option>critical</option></select></label>
      <label><span class="sr-only">Action</span>
        <select id="rule-action" name="action">
          <option value="none">alert only</option><option value="pause">then pause the run</option><option value="stop">then stop the run</option>
        </select></label>
      <button type="submit" class="primary" aria-label="Add alert rule">Add rule</button>
      <span id="rule-hint" class="muted"></span>
    </form>
    <p id="rule-error" class="error" role="alert" hidden></p>`;

  const form = $("#rule-form", el);
  const kind = $("#rule-kind", el);
  const threshold = $("#rule-threshold", el);
  const error = $("#rule-error", el);

  function syncForm() {
    const [unit, example] = UNITS[kind.value];
    $("#rule-unit", el).textContent = unit;
    threshold.placeholder = example;
    $("#rule-window-label", el).hidden = kind.value !== "accuracy_gain_per_100g_below";
    const value = Number(threshold.value);
    $("#rule-hint", el).textContent = threshold.value !== "" && Number.isFinite(value)
      ? `= ${describeRule({ kind: kind.value, threshold: value, window_rounds: Number($("#rule-window", el).value) || null })}` : "";
  }
  form.addEventListener("input", syncForm);
  syncForm();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      kind: kind.value,
      threshold: Number(threshold.value),
      level: $("#rule-level", el).value,
      action: $("#rule-action", el).value,
    };
    if (body.kind === "accuracy_gain_per_100g_below") body.window_rounds = Number($("#rule-window", el).value) || 5;
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    showError(error, null);
    try {
      const rule = await api(`${ctx.base}/rules`, { method: "POST", body });
      upsert(rule);
      threshold.value = "";
      syncForm();
    } catch (failure) {
      showError(error, failure);
    } finally {
      submit.disabled = false;
    }
  });

  $("#rules", el).addEventListener("click", async (event) => {
    const button = event.target.closest("button.btn-delete-rule");
    if (!button) return;
    const id = Number(button.closest("li").dataset.rule);
    button.disabled = true;
    showError(error, null);
    try {
      await api(`${ctx.base}/rules/${id}`, { method: "DELETE" });
      remove(id);
    } catch (failure) {
      button.disabled = false;
      if (failure.status === 404) remove(id); else showError(error, failure);
    }
  });

  function render() {
    const rules = ctx.state.rules;
    const unavailable = rules === null && !ctx.state.has("/api/runs/{}/rules");
    $("#rules-unavailable", el).hidden = !unavailable;
    form.hidden = unavailable;
    const list = rules || [];
    const fired = list.filter((r) => r.fired_at).length;
    $("#rules-summary", el).textContent = list.length ? `${list.length} rule${list.length > 1 ? "s" : ""}, ${fired} fired` : unavailable ? "" : "no rules yet";
    patchRows($("#rules", el), list.map((r) => ({ key: `r${r.id}`, html: item(r) })));
  }

  function upsert(rule) {
    if (!rule || ctx.state.rules === null) return;
    const rules = ctx.state.rules;
    const i = rules.findIndex((r) => r.id === rule.id);
    if (i >= 0) {
      const known = rules[i];
      rules[i] = { ...known, ...rule };
      if (known.fired_at && !rule.fired_at) { // a stale copy (e.g. the POST answer after the alert event)
        rules[i].fired_at = known.fired_at;
        rules[i].fired_value = known.fired_value;
      }
    } else rules.push(rule);
    rules.sort((a, b) => a.id - b.id);
    render();
  }
  function remove(id) {
    if (!ctx.state.rules) return;
    ctx.state.rules = ctx.state.rules.filter((r) => r.id !== id);
    render();
  }
  return { render, upsert, remove };
}

function item(rule) {
  const fired = Boolean(rule.fired_at);
  const what = describeRule(rule);
  const state = fired
    ? `<span class="rule-state fired">fired ${esc(utc(rule.fired_at))} UTC at ${esc(ruleValue(rule, rule.fired_value))}</span>`
    : `<span class="rule-state armed">armed</span>`;
  return `<li class="rule level-${esc(rule.level)}${fired ? " fired" : ""}" data-rule="${esc(rule.id)}" data-fired="${fired}">
    <span class="badge level-${esc(rule.level)}">${esc(rule.level)}</span>
    <span class="rule-what">${esc(what)}</span>
    <span class="muted">${esc(THEN[rule.action] || rule.action)}</span>
    ${state}
    <button type="button" class="btn-delete-rule link" aria-label="Delete rule: ${esc(what)}">Delete</button></li>`;
}
