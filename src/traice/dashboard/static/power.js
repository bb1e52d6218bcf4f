// Live power samples, kept per node for a sliding window only (bounded memory).

const MAX_POINTS = 1200; // per node: 5 minutes at 4 samples a second

export class PowerWindow {
  constructor(windowMs = 5 * 60 * 1000) {
    this.windowMs = windowMs;
    this.nodes = new Map(); // node_id -> {t: [ms], w: [W]} in time order
    this.latestMs = 0;
  }

  clear() {
    this.nodes.clear();
    this.latestMs = 0;
  }

  add(nodeId, tMs, watts) {
    if (!Number.isFinite(tMs) || !Number.isFinite(watts)) return;
    let series = this.nodes.get(nodeId);
    if (!series) this.nodes.set(nodeId, (series = { t: [], w: [] }));
    const n = series.t.length;
    if (n && tMs <= series.t[n - 1]) { // a repeat (REST and socket overlap) or out of order: rare
      if (series.t.includes(tMs)) return;
      let i = n - 1;
      while (i > 0 && series.t[i - 1] > tMs) i--;
      series.t.splice(i, 0, tMs);
      series.w.splice(i, 0, watts);
    } else {
      series.t.push(tMs);
      series.w.push(watts);
    }
    if (tMs > this.latestMs) this.latestMs = tMs;
    this.trim(series, tMs - this.windowMs);
  }

  // Drop what fell out of the window; in chunks, so that it costs little per sample.
  trim(series, cutoffMs) {
    const excess = series.t.length - MAX_POINTS;
    if (excess <= 0 && !(series.t[0] < cutoffMs - 10_000)) return;
    let i = 0;
    while (i < series.t.length && series.t[i] < cutoffMs) i++;
    i = Math.max(i, excess);
    series.t.splice(0, i);
    series.w.splice(0, i);
  }

  // Sum of each node's latest sample, when not older than maxAgeMs before `nowMs`.
  current(nowMs, maxAgeMs = 30_000) {
    let total = 0;
    let nodes = 0;
    for (const series of this.nodes.values()) {
      const n = series.t.length;
      if (n && nowMs - series.t[n - 1] <= maxAgeMs) {
        total += series.w[n - 1];
        nodes++;
      }
    }
    return nodes ? total : null;
  }

  // The `max` nodes with the highest latest power in the window starting at startMs.
  lines(startMs, max) {
    const found = [];
    for (const [nodeId, series] of this.nodes) {
      const n = series.t.length;
      if (n && series.t[n - 1] >= startMs) found.push({ nodeId, series, last: series.w[n - 1] });
    }
    found.sort((a, b) => b.last - a.last || (a.nodeId < b.nodeId ? -1 : 1));
    const lines = found.slice(0, max).map(({ nodeId, series }) => {
      let i = 0;
      while (i < series.t.length && series.t[i] < startMs) i++;
      return { node_id: nodeId, t: series.t.slice(i), w: series.w.slice(i) };
    });
    return { lines, count: found.length };
  }

  // Power of all nodes together, in bins: each node's mean power in a bin, summed; a node with
  // no sample in a bin counts with its previous value for up to 30 s (samples come about once a second).
  total(startMs, endMs, binMs = 5000) {
    const bins = Math.max(1, Math.ceil((endMs - startMs) / binMs));
    const sum = new Float64Array(bins);
    const seen = new Uint8Array(bins);
    for (const series of this.nodes.values()) {
      const mean = new Float64Array(bins);
      const count = new Uint32Array(bins);
      for (let i = 0; i < series.t.length; i++) {
        const b = Math.floor((series.t[i] - startMs) / binMs);
        if (b < 0 || b >= bins) continue;
        mean[b] += series.w[i];
        count[b]++;
      }
      let carry = null;
      let age = 0;
      for (let b = 0; b < bins; b++) {
        if (count[b]) { carry = mean[b] / count[b]; age = 0; } else if (++age * binMs > 30_000) carry = null;
        if (carry !== null) { sum[b] += carry; seen[b] = 1; }
      }
    }
    const t = [];
    const w = [];
    const lastBin = Math.floor((Math.min(endMs, this.latestMs) - startMs) / binMs);
    for (let b = 0; b < bins && b <= lastBin; b++) {
      if (seen[b]) { t.push(startMs + (b + 0.5) * binMs); w.push(sum[b]); }
    }
    return { t, w };
  }
}
