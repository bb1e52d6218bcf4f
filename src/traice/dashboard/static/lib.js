// Shared plumbing: REST calls, the dashboard socket, throttling, table patching.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch() a JSON endpoint; errors become ApiError with the server's {"error": {code, message}}.
export async function api(path, { method = "GET", body } = {}) {
  const options = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch {
    throw new ApiError(0, "network", "The TRAICE server cannot be reached.");
  }
  const text = response.status === 204 ? "" : await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (response.status === 401 && location.pathname !== "/login") {
    location.assign("/login"); // the server has an admin token and this browser has not signed in
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || response.statusText);
  }
  return data;
}

// Which API paths this server has, from its OpenAPI schema: newer features (control, rules,
// forecast, per-client rounds) are used only when present, so an older server gets no 404s.
let schema = null;
export function features() {
  schema ??= api("/openapi.json")
    .then((s) => {
      const paths = new Set(Object.keys((s && s.paths) || {}).map((p) => p.replace(/\{[^}]+\}/g, "{}")));
      return (path) => paths.has(path);
    })
    .catch(() => () => true); // no schema: try everything
  return schema;
}

// Run `fn` at most once every `ms` milliseconds (trailing), never two at a time when async,
// and, when it is slow (a big run on a busy server), at most half of the time.
export function throttle(fn, ms) {
  let timer = null;
  let next = 0; // earliest start of the next run
  let running = false;
  let again = false;
  let dead = false;
  const run = async () => {
    timer = null;
    if (dead) return;
    running = true;
    const start = Date.now();
    try {
      await fn();
    } catch (error) {
      console.warn("traice:", error);
    } finally {
      const end = Date.now();
      next = Math.max(start + ms, end + (end - start));
      running = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  };
  function schedule() {
    if (dead) return;
    if (running) { again = true; return; }
    if (timer) return;
    timer = setTimeout(run, Math.max(0, next - Date.now()));
  }
  schedule.cancel = () => { dead = true; clearTimeout(timer); };
  return schedule;
}

// ---------------------------------------------------------------- the dashboard socket

const listeners = new Set();
export function onEvent(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}
function emit(message) {
  for (const fn of [...listeners]) {
    try { fn(message); } catch (error) { console.warn("traice:", error); }
  }
}

let socket = null;
let connectedOnce = false;
let retryMs = 1000;
export function connect() {
  const live = document.getElementById("live");
  const setLive = (on, text) => {
    live.textContent = text;
    live.classList.toggle("off", !on);
    live.title = on ? "Receiving live updates" : "Live updates are down; retrying";
  };
  socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/dashboard`);
  socket.onopen = () => {
    setLive(true, "live");
    retryMs = 1000;
    if (connectedOnce) emit({ type: "reconnected" }); // events were missed: views reload from REST
    connectedOnce = true;
  };
  socket.onmessage = (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    if (message && message.type === "batch" && Array.isArray(message.events)) {
      message.events.forEach((one) => { if (one && typeof one.type === "string") emit(one); });
    } else if (message && typeof message.type === "string") emit(message);
  };
  socket.onclose = () => {
    setLive(false, "reconnecting…");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 15000);
  };
}

// ---------------------------------------------------------------- DOM helpers

export const $ = (selector, root = document) => root.querySelector(selector);

function rowFrom(html) {
  const template = document.createElement("template");
  template.innerHTML = html.trim();
  return template.content.firstElementChild;
}

// Make tbody hold exactly `rows` ([{key, html}], html a whole <tr>), touching only rows that
// changed, so that focus and scroll survive live updates.
export function patchRows(tbody, rows) {
  const old = new Map();
  for (const tr of tbody.children) old.set(tr.dataset.key, tr);
  const wanted = rows.map(({ key, html }) => {
    const existing = old.get(key);
    if (existing && existing._html === html) {
      old.delete(key);
      return existing;
    }
    const tr = rowFrom(html);
    tr.dataset.key = key;
    tr._html = html;
    return tr;
  });
  for (const tr of old.values()) tr.remove();
  wanted.forEach((tr, i) => {
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
}

// "‹ Prev  1–50 of 1,000  Next ›" under a table.
export function pager(el, { page, size, total, label }, onPage) {
  const pages = Math.max(1, Math.ceil(total / size));
  const current = Math.min(page, pages - 1);
  const first = total ? current * size + 1 : 0;
  const last = Math.min(total, (current + 1) * size);
  el.innerHTML = total <= size
    ? `<span>${total.toLocaleString("en")} ${total === 1 ? label.replace(/s$/, "") : label}</span>`
    : `<button type="button" data-page="${current - 1}" ${current === 0 ? "disabled" : ""} aria-label="Previous page of ${label}">‹ Prev</button>
       <span>${first.toLocaleString("en")}–${last.toLocaleString("en")} of ${total.toLocaleString("en")} ${label}</span>
       <button type="button" data-page="${current + 1}" ${current >= pages - 1 ? "disabled" : ""} aria-label="Next page of ${label}">Next ›</button>`;
  el.onclick = (event) => {
    const button = event.target.closest("button[data-page]");
    if (button && !button.disabled) onPage(Number(button.dataset.page));
  };
  return current;
}
