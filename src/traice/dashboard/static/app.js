// TRAICE dashboard: hash router, live socket, alert banner. Views: runs.js, run.js, compare.js.
import { compareView } from "./compare.js";
import { describeRule, esc, ruleValue } from "./format.js";
import { connect, onEvent } from "./lib.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";

const ROUTES = [
  [/^#?\/?$/, (root) => runsView(root)],
  [/^#\/runs\/(\d+)\/?$/, (root, id) => runView(root, Number(id))],
  [/^#\/compare\/(\d+)\/(\d+)\/?$/, (root, a, b) => compareView(root, Number(a), Number(b))],
];

let view = null;
function route() {
  const root = document.getElementById("app");
  if (view && view.destroy) view.destroy();
  view = null;
  const hash = location.hash || "#/";
  for (const [pattern, open] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      // Each view gets its own element: late answers to a view that is gone land in its
      // detached element, never in the next view.
      const el = document.createElement("div");
      el.className = "view";
      root.replaceChildren(el);
      view = open(el, ...match.slice(1));
      window.scrollTo(0, 0);
      return;
    }
  }
  location.replace("#/");
}

// A fired alert rule, wherever one is looking: a banner until dismissed (the newest few).
function banner(message) {
  const rule = message.data || {};
  const box = document.getElementById("banner");
  const item = document.createElement("div");
  item.className = `alert-banner level-${esc(rule.level || "warning")}`;
  item.setAttribute("role", "alert");
  item.dataset.rule = rule.id;
  item.dataset.run = message.run_id;
  const then = rule.action && rule.action !== "none" ? ` — the run is asked to ${esc(rule.action)}` : "";
  item.innerHTML = `<span><b>${esc(rule.level || "alert")}</b> · <a href="#/runs/${esc(message.run_id)}">run #${esc(message.run_id)}</a>:
    ${esc(describeRule(rule))} (now ${esc(ruleValue(rule, rule.fired_value))})${then}</span>
    <button type="button" class="link" aria-label="Dismiss this alert">Dismiss</button>`;
  item.querySelector("button").addEventListener("click", () => item.remove());
  box.prepend(item);
  while (box.children.length > 3) box.lastElementChild.remove();
}

onEvent((message) => {
  if (message.type === "alert") banner(message);
  if (view && view.onEvent) view.onEvent(message);
});
window.addEventListener("hashchange", route);
route();
connect();
