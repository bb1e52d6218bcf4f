// Formatting helpers: readable units, escaping. Every string from the API goes through esc()
// before it is put into HTML.

const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const esc = (s) => (s === null || s === undefined ? "" : String(s).replace(/[&<>"']/g, (c) => ENTITIES[c]));

const missing = (v) => v === null || v === undefined || Number.isNaN(Number(v));
export const DASH = "–";

// Three significant digits, without exponent notation for the ranges we show.
export function sig(v, digits = 3) {
  if (missing(v)) return DASH;
  const n = Number(v);
  if (n === 0) return "0";
  const abs = Math.abs(n);
  const decimals = Math.max(0, digits - 1 - Math.floor(Math.log10(abs)));
  return n.toFixed(Math.min(decimals, 6));
}

// Scales, smallest first: [factor from the base unit, label].
const ENERGY = [[1e9, "µWh"], [1e6, "mWh"], [1e3, "Wh"], [1, "kWh"], [1e-3, "MWh"]]; // base kWh
const CO2 = [[1e9, "µg"], [1e6, "mg"], [1e3, "g"], [1, "kg"], [1e-3, "t"]]; // base kg
const POWER = [[1e3, "mW"], [1, "W"], [1e-3, "kW"]]; // base W
const BYTES = [[1, "B"], [1 / 1024, "KiB"], [1 / 1024 ** 2, "MiB"], [1 / 1024 ** 3, "GiB"]];

// The scale that shows `v` (in base units) with 1 ≤ value < 1000 (or the nearest end).
export function pickScale(v, scales, zero = 1) {
  const abs = Math.abs(Number(v) || 0);
  if (abs === 0) return scales[Math.min(zero, scales.length - 1)];
  for (let i = scales.length - 1; i >= 0; i--) if (abs * scales[i][0] >= 1) return scales[i];
  return scales[0];
}

function scaled(v, scales, zero) {
  if (missing(v)) return DASH;
  const [factor, label] = pickScale(v, scales, zero);
  return `${sig(Number(v) * factor)} ${label}`;
}

export const energy = (kwh) => scaled(kwh, ENERGY, 2); // 0 → "0 Wh"
export const co2 = (kg) => scaled(kg, CO2, 2); // 0 → "0 g"
export const power = (w) => scaled(w, POWER, 1); // 0 → "0 W"
export const bytes = (b) => scaled(b, BYTES, 0);

// Chart units: one scale for a whole series, chosen from its largest value: [factor, label].
export const energyUnit = (maxKwh) => pickScale(maxKwh, ENERGY, 2);
export const co2Unit = (maxKg) => pickScale(maxKg, CO2, 2);

export const accuracy = (v) => (missing(v) ? DASH : Number(v).toFixed(3));
export const num = (v, d = 0) => (missing(v) ? DASH : Number(v).toFixed(d));

export function seconds(s) {
  if (missing(s)) return DASH;
  const n = Number(s);
  if (n > 0 && n < 1) return `${sig(n * 1000)} ms`;
  if (n < 60) return `${sig(n)} s`;
  if (n < 3600) return `${Math.floor(n / 60)} min ${Math.round(n % 60)} s`;
  return `${Math.floor(n / 3600)} h ${Math.round((n % 3600) / 60)} min`;
}

// "2026-11-22T01:58:04.716Z" → "2026-11-22 01:58:04" (UTC, as the API gives it).
export const utc = (iso) => (iso ? String(iso).replace("T", " ").slice(0, 19) : DASH);
export const clock = (iso) => (iso ? String(iso).slice(11, 19) : DASH);
export const ms = (iso) => (iso ? Date.parse(iso) : NaN);

export function ago(iso, now = Date.now()) {
  const t = ms(iso);
  if (Number.isNaN(t)) return DASH;
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return utc(iso);
}

// Best accuracy figure of a round: the global model's (server) when measured, else the clients'.
export const roundAccuracy = (r) => (r && r.server_accuracy !== null && r.server_accuracy !== undefined ? r.server_accuracy : r ? r.accuracy : null);

// An alert rule in words: "Emissions over 5 mg CO₂e".
export function describeRule(rule) {
  const t = rule.threshold;
  switch (rule.kind) {
    case "emissions_kg_over": return `Emissions over ${co2(t)} CO₂e`;
    case "power_w_over": return `Power over ${power(t)}`;
    case "accuracy_gain_per_100g_below":
      return `Accuracy gain below ${sig(t)} per 100 g CO₂e${rule.window_rounds ? ` over ${rule.window_rounds} rounds` : ""}`;
    default: return `${rule.kind} ${sig(t)}`;
  }
}

// The value a rule fired at, in the rule's unit.
export function ruleValue(rule, value) {
  if (value === null || value === undefined) return DASH;
  if (rule.kind === "emissions_kg_over") return `${co2(value)} CO₂e`;
  if (rule.kind === "power_w_over") return power(value);
  return sig(value);
}
