// TRAICE dashboard: hash router, live socket, alert and database banners. Views: runs.js, run.js, compare.js.
import { compareView } from "./compare.js";
import { clock, describeRule, esc, ruleValue, utc } from "./format.js";
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
  const health = document.getElementById("db-health");
  box.insertBefore(item, health ? health.nextSibling : box.firstChild); // the database's state stays on top
  const rules = box.querySelectorAll(".alert-banner[data-rule]");
  for (let i = 3; i < rules.length; i++) rules[i].remove();
}

// The server's database: while it is unreachable, a banner (not dismissable) until it is back.
// The server says so once when it goes, once when it returns, and to every dashboard that
// connects meanwhile.
function databaseHealth(data) {
  const box = document.getElementById("banner");
  let item = document.getElementById("db-health");
  if (!data || data.database === "ok") {
    if (item) item.remove();
    return;
  }
  if (!item) {
    item = document.createElement("div");
    item.id = "db-health";
    item.className = "alert-banner level-critical db-health";
    item.setAttribute("role", "alert");
    box.prepend(item);
  }
  // UTC, like every time on this dashboard (the server sends an ISO time in UTC).
  const since = new Date(data.since || Date.now());
  const at = Number.isNaN(since.getTime()) ? "" : ` since ${clock(since.toISOString())}`;
  item.dataset.since = data.since || "";
  item.title = Number.isNaN(since.getTime()) ? "" : `${utc(since.toISOString())} UTC`;
  item.innerHTML = `<span><b>Database unreachable${esc(at)}</b> — reports are held and will be stored when it is back</span>`;
}

onEvent((message) => {
  if (message.type === "alert") banner(message);
  if (message.type === "health") databaseHealth(message.data);
  if (message.type === "reconnected") databaseHealth(null); // a new socket hears again if it is still down
  if (view && view.onEvent) view.onEvent(message);
});
window.addEventListener("hashchange", route);
route();
connect();
