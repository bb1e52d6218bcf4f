// Control bar of a run: Pause / Resume / Stop, and where each command stands.
import { clock, esc } from "./format.js";
import { $, api, patchRows } from "./lib.js";

// Plain words for the refusals the server answers with 409 (and a few others).
const WHY = {
  already_paused: "The run is already paused.",
  not_paused: "The run is not paused, so there is nothing to resume.",
  run_finished: "The run has ended; it takes no more commands.",
  run_stopping: "The run is stopping; it takes no more commands.",
  command_pending: "An earlier command is still on its way to the clients. Wait until it is done, then try again.",
  already_excluded: "This client is already excluded.",
  not_excluded: "This client is not excluded.",
  client_not_found: "This client is not part of the run.",
  client_finished: "This client has finished; it takes no more commands.",
  run_not_found: "This run does not exist any more.",
  network: "The TRAICE server cannot be reached.",
};
export const explain = (error) => WHY[error.code] || error.message || "The request failed.";

export function showError(el, error) {
  el.hidden = !error;
  el.textContent = error ? explain(error) : "";
  if (error) el.dataset.code = error.code; else delete el.dataset.code;
}

const STEPS = ["requested", "acknowledged", "done"];
const ACTIONS = { pause: "Pause", resume: "Resume", stop: "Stop", exclude: "Exclude", include: "Include" };
const SHOWN = 8; // newest commands listed

export function controlBar(el, listEl, ctx) {
  el.innerHTML = `
    <div class="controls" role="group" aria-label="Run control">
      <button id="btn-pause" type="button" aria-label="Pause the run">Pause</button>
      <button id="btn-resume" type="button" aria-label="Resume the run">Resume</button>
      <button id="btn-stop" type="button" class="danger" aria-label="Stop the run">Stop</button>
    </div>
    <p id="control-error" class="error" role="alert" hidden></p>`;
  listEl.innerHTML = `<h3 class="sr-only">Commands</h3>
    <ol id="commands" class="commands" aria-label="Commands, newest first" aria-live="polite"></ol>`;
  const buttons = { pause: $("#btn-pause", el), resume: $("#btn-resume", el), stop: $("#btn-stop", el) };
  const error = $("#control-error", el);
  let busy = false;

  async function send(action) {
    if (action === "stop" && !window.confirm("Stop this run?\n\nThe FL server ends it after the current round; a stopped run cannot be resumed.")) return;
    busy = true;
    render();
    showError(error, null);
    try {
      const command = await api(`${ctx.base}/control`, { method: "POST", body: { action } });
      if (command) ctx.upsertCommand(command);
      ctx.reloadRun();
    } catch (failure) {
      showError(error, failure);
    } finally {
      busy = false;
      render();
    }
  }
  for (const [action, button] of Object.entries(buttons)) button.addEventListener("click", () => send(action));

  function render() {
    const status = ctx.state.run ? ctx.state.run.status : null;
    const can = ctx.state.has("/api/runs/{}/control");
    buttons.pause.disabled = busy || !can || status !== "running";
    buttons.resume.disabled = busy || !can || status !== "paused";
    buttons.stop.disabled = busy || !can || !(status === "running" || status === "paused");
    for (const button of Object.values(buttons)) button.title = can ? "" : "This TRAICE server has no run control.";
    const list = $("#commands", listEl);
    const commands = ctx.state.commands.slice(0, SHOWN);
    listEl.hidden = !commands.length;
    patchRows(list, commands.map((c) => ({ key: `c${c.id}`, html: item(c) })));
  }

  return { render };
}

function item(c) {
  const failed = c.status === "failed";
  const reached = failed ? STEPS.length - 1 : STEPS.indexOf(c.status);
  const steps = STEPS.map((step, i) => {
    if (failed && i === STEPS.length - 1) return `<span class="step failed">failed</span>`;
    const cls = i < reached ? "past" : i === reached ? "now" : "todo";
    return `<span class="step ${cls}">${step}</span>`;
  }).join(`<span class="arrow" aria-hidden="true">→</span>`);
  const target = c.node_id ? `client <b>${esc(c.node_id)}</b>` : "run";
  const source = c.source && c.source !== "user" ? ` <span class="muted">by ${esc(String(c.source).replace(/^rule:/, "rule #"))}</span>` : "";
  return `<li class="cmd cmd-${esc(c.status)}" data-command="${esc(c.id)}" data-status="${esc(c.status)}">
    <time datetime="${esc(c.updated_at)}" class="muted">${esc(clock(c.updated_at))}</time>
    <span class="cmd-what">${esc(ACTIONS[c.action] || c.action)} ${target}${source}</span>
    <span class="steps" aria-label="status: ${esc(c.status)}">${steps}</span>
    <span class="muted cmd-detail">${esc(c.detail || "")}</span></li>`;
}
