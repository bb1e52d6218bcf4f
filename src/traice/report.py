"""``traice report``: one self-contained HTML (or JSON) report of a run, readable offline.

The HTML carries its own CSS, its data and the plotly.js bundle of the plotly Python package: no CDN, no
other file. Every string that comes from the API is escaped before it goes into the page.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from enum import Enum
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated, Any

import httpx
import typer

from . import __version__
from .equivalents import equivalents
from .rest import admin_headers

COMPONENTS = ("compute", "upload", "download", "server")
COLORS = {"compute": "#2e7d4f", "upload": "#3b7fb6", "download": "#d08c2f", "server": "#8d9992"}
# (factor from the base unit, label), largest unit first; base units kWh and kg.
ENERGY_UNITS = ((1e-3, "MWh"), (1.0, "kWh"), (1e3, "Wh"), (1e6, "mWh"), (1e9, "µWh"))
CO2_UNITS = ((1e-3, "t"), (1.0, "kg"), (1e3, "g"), (1e6, "mg"), (1e9, "µg"))
DEFAULT_SERVER = "http://127.0.0.1:3000"


class ReportError(Exception):
    """A report that cannot be made; ``exit_code`` is 2 when the server is unreachable, else 1."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ReportFormat(str, Enum):
    html = "html"
    json = "json"


def _get(client: httpx.Client, path: str, *, optional: bool = False) -> Any:
    try:
        response = client.get(path)
        if optional and response.status_code >= 400:
            return None
        if response.status_code >= 400:
            try:
                detail = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = response.text
            raise ReportError(f"{response.status_code}: {detail}", 1)
        return response.json()
    except httpx.HTTPError as exc:
        raise ReportError(f"cannot reach the TRAICE server at {client.base_url}: {exc}", 2) from None
    except ValueError:
        raise ReportError(f"{client.base_url} answered {path} with something other than JSON", 2) from None


def _resolve(client: httpx.Client, run: str) -> int:
    if run.isdigit():
        return int(run)
    ids = [r["id"] for r in _get(client, "/api/runs") if r["name"] == run]
    if not ids:
        raise ReportError(f"no run {run!r} on {client.base_url}; `traice runs` lists them", 1)
    return max(ids)  # a name means its latest run


def _share(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def _forecast(body: Any, rounds: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any] | None:
    """The forecast endpoint's answer when it has a total (it needs ``rounds_planned``), with the line from the
    last round to that total, and the total's error against the actual one for a run that ended after as many
    rounds as the forecast is for (not for one stopped early)."""
    if not isinstance(body, dict) or not isinstance(body.get("emissions_kg_at_end"), (int, float)):
        return None
    last_round, spent_kg = (rounds[-1]["round"], rounds[-1]["cumulative_emissions_kg"]) if rounds else (0, 0.0)
    horizon = body.get("rounds_planned") or last_round
    points = [{"round": last_round, "emissions_kg": spent_kg},
              {"round": horizon, "emissions_kg": body["emissions_kg_at_end"]}]
    comparable = run["ended_at"] is not None and horizon == last_round and run["emissions_kg"] > 0
    error = _share(body["emissions_kg_at_end"] - run["emissions_kg"], run["emissions_kg"]) if comparable else None
    return {**body, "points": points, "error_pct": error}


def build_report(server_url: str, run: str) -> dict[str, Any]:
    """The report of ``run`` (an id, or a name for its latest run) from the TRAICE server at ``server_url``:
    run, breakdown by component, rounds, clients, assumptions, equivalents and forecast (None without one).
    Raises :class:`ReportError`."""
    with httpx.Client(base_url=server_url.rstrip("/"), timeout=30, headers=admin_headers()) as client:
        run_id = _resolve(client, run)
        detail = _get(client, f"/api/runs/{run_id}")
        api_rounds = _get(client, f"/api/runs/{run_id}/rounds")
        forecast = _get(client, f"/api/runs/{run_id}/forecast", optional=True)

    parts = detail["by_component"]
    total_kwh = sum(parts[c]["energy_kwh"] for c in COMPONENTS)
    total_kg = sum(parts[c]["emissions_kg"] for c in COMPONENTS)
    breakdown = {c: {**parts[c], "energy_share_pct": _share(parts[c]["energy_kwh"], total_kwh),
                     "emissions_share_pct": _share(parts[c]["emissions_kg"], total_kg)} for c in COMPONENTS}
    rounds: list[dict[str, Any]] = []
    cumulative_kwh = cumulative_kg = 0.0
    for r in api_rounds:
        cumulative_kwh, cumulative_kg = cumulative_kwh + r["energy_kwh"], cumulative_kg + r["emissions_kg"]
        # the global model's accuracy when the FL server measured it, else the clients' weighted accuracy
        model_accuracy = r["server_accuracy"] if r.get("server_accuracy") is not None else r["accuracy"]
        rounds.append({**r, "model_accuracy": model_accuracy, "cumulative_energy_kwh": cumulative_kwh,
                       "cumulative_emissions_kg": cumulative_kg})
    measured = [r["model_accuracy"] for r in rounds if r["model_accuracy"] is not None]
    model = detail.get("carbon_model") or {}
    return {
        "report": {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "traice_version": __version__, "server": server_url},
        "run": {**{k: v for k, v in detail.items() if k not in ("by_component", "by_client", "intensities")},
                "final_accuracy": measured[-1] if measured else detail["accuracy"]},
        "breakdown": breakdown,
        "rounds": rounds,
        "clients": [{**c, "emissions_share_pct": _share(c["emissions_kg"], total_kg)} for c in detail["by_client"]],
        "assumptions": {"network_kwh_per_gb": model.get("network_kwh_per_gb", detail["network_kwh_per_gb"]),
                        "network_source": model.get("network_source"),
                        "intensity_trace": model.get("intensity_trace"), "parties": detail["intensities"]},
        "equivalents": equivalents(detail["emissions_kg"]),
        "forecast": _forecast(forecast, rounds, detail),
    }


def _unit(largest: float, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    """The unit that shows ``largest`` as 1 <= value < 1000 (the third for zero: Wh, g)."""
    if not largest:
        return units[2]
    return next(((f, u) for f, u in units if abs(largest) * f >= 1), units[-1])


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 999.5 else f"{x:.3g}"


def _energy(kwh: float) -> str:
    factor, unit = _unit(kwh, ENERGY_UNITS)
    return f"{_num(kwh * factor)} {unit}"


def _co2(kg: float) -> str:
    factor, unit = _unit(kg, CO2_UNITS)
    return f"{_num(kg * factor)} {unit} CO₂e"


def _when(iso: str | None) -> str:
    return iso[:19].replace("T", " ") + " UTC" if iso else "–"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell is escaped here."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _layout(title: str, xlabel: str, ylabel: str, **extra: Any) -> dict[str, Any]:
    xaxis = {"title": {"text": xlabel}, **extra.pop("xaxis", {})}
    return {"title": {"text": title, "x": 0.01}, "xaxis": xaxis, "yaxis": {"title": {"text": ylabel}}, **extra}


def _line(name: str, x: list[Any], y: list[float], **extra: Any) -> dict[str, Any]:
    return {"type": "scatter", "mode": "lines+markers", "name": name, "x": x, "y": y, **extra}


def _stacked(x: list[Any], rows: list[dict[str, Any]], quantity: str, title: str, xlabel: str) -> dict[str, Any]:
    """Bars of ``quantity`` (energy_kwh or emissions_kg) stacked by component, in one readable unit."""
    units, what = (ENERGY_UNITS, "energy") if quantity == "energy_kwh" else (CO2_UNITS, "emissions")
    factor, unit = _unit(max((r[quantity] for r in rows), default=0.0), units)
    data = [{"type": "bar", "name": c, "x": x, "y": [r[f"{c}_{quantity}"] * factor for r in rows],
             "marker": {"color": COLORS[c]}} for c in COMPONENTS]
    return {"data": data, "layout": _layout(title, xlabel, f"{what} ({unit})", barmode="stack",
                                            xaxis={"type": "category"})}


def _figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Plotly figures (data + layout). Strings from the API are escaped: plotly shows entities as plain text."""
    rounds, breakdown, forecast = report["rounds"], report["breakdown"], report["forecast"]
    numbers = [r["round"] for r in rounds]
    shares = [{"type": "bar", "orientation": "h", "name": c, "y": ["energy", "emissions"],
               "x": [breakdown[c]["energy_share_pct"], breakdown[c]["emissions_share_pct"]],
               "marker": {"color": COLORS[c]}, "hovertemplate": f"{c}: %{{x:.1f}} %<extra></extra>"}
              for c in COMPONENTS]
    points = forecast["points"] if forecast else []
    cumulative = [r["cumulative_emissions_kg"] for r in rounds]
    factor, unit = _unit(max(cumulative + [p["emissions_kg"] for p in points], default=0.0), CO2_UNITS)
    co2_axis = f"cumulative emissions ({unit} CO₂e)"
    measured = [r for r in rounds if r["model_accuracy"] is not None]
    tradeoff = _line("accuracy", [r["cumulative_emissions_kg"] * factor for r in measured],
                     [r["model_accuracy"] for r in measured], customdata=[r["round"] for r in measured],
                     hovertemplate=f"round %{{customdata}}<br>%{{x:.3g}} {unit} CO₂e<br>accuracy %{{y:.3f}}"
                                   "<extra></extra>")
    names = [html.escape(c["node_id"], quote=False) + (" (FL server)" if c["role"] == "server" else "")
             for c in report["clients"]]
    figures = {
        "breakdown": {"data": shares, "layout": _layout("Share of each component", "share (%)", "", barmode="stack",
                                                        height=260, xaxis={"range": [0, 100]})},
        "tradeoff": {"data": [tradeoff], "layout": _layout("Accuracy vs cumulative emissions", co2_axis, "accuracy")},
        "clients": _stacked(names, report["clients"], "emissions_kg", "Emissions per client", "client"),
        "rounds_energy": _stacked(numbers, rounds, "energy_kwh", "Energy per round", "round"),
        "rounds_emissions": _stacked(numbers, rounds, "emissions_kg", "Emissions per round", "round"),
    }
    if forecast:
        actual = _line("actual", numbers, [kg * factor for kg in cumulative], line={"color": COLORS["compute"]})
        predicted = _line("forecast", [p["round"] for p in points], [p["emissions_kg"] * factor for p in points],
                          line={"dash": "dash", "color": COLORS["download"]})
        figures["forecast"] = {"data": [actual, predicted],
                               "layout": _layout("Cumulative emissions: forecast vs actual", "round", co2_axis,
                                                 xaxis={"dtick": 1})}
    return figures


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' can end it or open a comment."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(report: dict[str, Any]) -> str:
    """The report as one HTML page, CSS, data and plotly.js inline: it opens offline, from anywhere."""
    run, assumptions, forecast, e = report["run"], report["assumptions"], report["forecast"], html.escape
    kpis = [("Status", run["status"]), ("Started", _when(run["started_at"])), ("Ended", _when(run["ended_at"])),
            ("Clients", run["clients"]),
            ("Rounds", f"{run['rounds']}" + (f" of {run['rounds_planned']}" if run["rounds_planned"] else "")),
            ("Total energy", _energy(run["energy_kwh"])), ("Total emissions", _co2(run["emissions_kg"])),
            ("Final accuracy", "–" if run["final_accuracy"] is None else f"{run['final_accuracy']:.3f}"),
            ("Data moved", f"{_num(run['bytes_up'] / 1e6)} MB up, {_num(run['bytes_down'] / 1e6)} MB down")]
    breakdown = _table(["component", "energy", "energy share", "emissions", "emissions share"], [
        [c, _energy(b["energy_kwh"]), f"{b['energy_share_pct']:.1f} %", _co2(b["emissions_kg"]),
         f"{b['emissions_share_pct']:.1f} %"] for c, b in report["breakdown"].items()])
    clients = _table(["client", "role", "energy", "emissions", "share"], [
        [c["node_id"], c["role"], _energy(c["energy_kwh"]), _co2(c["emissions_kg"]),
         f"{c['emissions_share_pct']:.1f} %"] for c in report["clients"]])
    parties = _table(["party", "role", "country", "region", "intensity (g CO₂e/kWh)", "source", "PUE"], [
        [p["node_id"], p["role"], p["country_iso_code"] or "–", p["region"] or "–", f"{p['intensity_g_per_kwh']:.1f}",
         p["intensity_source"] or "–", p["pue"]] for p in assumptions["parties"]])
    equivalents = _table(["about", "", "source"], [
        [f"{_num(q['value'])} {q['unit']}", q["label"], q["source"]] for q in report["equivalents"]])
    trace = assumptions["intensity_trace"]
    if isinstance(trace, dict):
        trace = f"{trace.get('file')} ({trace.get('basis')}) for zones {', '.join(map(str, trace.get('zones') or []))}"
    forecast_html = ""
    if forecast:
        note = f"Forecast total: {_co2(forecast['emissions_kg_at_end'])} after {forecast['points'][-1]['round']} rounds"
        if forecast["error_pct"] is not None:
            note += f" ({forecast['error_pct']:+.1f} % against the actual total)"
        elif run["ended_at"]:
            note += f" (the run ended after {report['rounds'][-1]['round'] if report['rounds'] else 0} rounds)"
        energy, carbontracker = forecast.get("energy_kwh_at_end"), forecast.get("carbontracker_energy_kwh_at_end")
        if isinstance(energy, (int, float)) and isinstance(carbontracker, (int, float)):
            note += f"; energy {_energy(energy)}, where Carbontracker's rounds × first round gives "
            note += _energy(carbontracker)
        forecast_html = f'<div><div class="chart" id="forecast"></div><p class="note">{e(note)}.</p></div>'
    meta = report["report"]
    return PAGE.substitute(
        title=e(f"TRAICE report: {run['name']} (run {run['id']})"), name=e(run["name"]), run_id=e(str(run["id"])),
        generated=e(f"{_when(meta['generated_at'])} by traice {meta['traice_version']} from {meta['server']}"),
        kpis="".join(f'<div class="kpi"><span>{e(k)}</span><b>{e(str(v))}</b></div>' for k, v in kpis),
        breakdown=breakdown, clients=clients, parties=parties, equivalents=equivalents, forecast=forecast_html,
        network=e(f"{assumptions['network_kwh_per_gb']} kWh per GB moved "
                  f"({assumptions['network_source'] or 'no source recorded'})"),
        trace=e(str(trace) if trace else "none: each party's annual average"),
        figures=_script_json(_figures(report)),
        plotly=(resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8"),
    )


PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
:root { --ink: #1d2b22; --muted: #5f6f65; --line: #dde5df; --soft: #eef3ef; --green: #174d2c; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: var(--ink);
       background: #f5f8f5; font-size: 14px; line-height: 1.4; }
header { background: var(--green); color: #fff; padding: .8rem 1.5rem; }
header h1 { margin: 0; font-size: 1.35rem; } header p { margin: .2rem 0 0; opacity: .8; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin: 1rem 0; }
h2 { margin: 0 0 .6rem; font-size: 1.1rem; }
.kpis { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .6rem; }
.kpi { background: var(--soft); border-radius: 6px; padding: .5rem .7rem; }
.kpi span { display: block; color: var(--muted); font-size: .8rem; } .kpi b { font-size: 1.05rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 1rem; }
.chart { min-height: 340px; } #breakdown { min-height: 260px; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: .85rem; }
.note { color: var(--muted); font-size: .85rem; }
@media print { .chart, table { break-inside: avoid; } }
</style></head>
<body>
<header><h1>TRAICE report: $name <small>(run $run_id)</small></h1><p>Generated $generated</p></header>
<main>
<section><h2>The run</h2><div class="kpis">$kpis</div></section>
<section><h2>Where the emissions come from</h2>$breakdown<div class="chart" id="breakdown"></div>
<p class="note">For comparison, Green FL (Yousefpour et al. 2023) measured production FL at about 46–50 % client
compute, 27–29 % upload, 22–24 % download and 1–2 % server.</p></section>
<section><h2>Accuracy and emissions</h2>
<div class="grid"><div class="chart" id="tradeoff"></div>$forecast</div></section>
<section><h2>Per client</h2><div class="grid"><div class="chart" id="clients"></div><div>$clients</div></div></section>
<section><h2>Per round</h2><div class="grid"><div class="chart" id="rounds_energy"></div>
<div class="chart" id="rounds_emissions"></div></div></section>
<section><h2>In everyday terms</h2>$equivalents
<p class="note">Rough comparisons of the run's total emissions; the car figures are tailpipe CO₂ only.</p></section>
<section><h2>Assumptions</h2><p>Network: $network.<br>Hourly intensity trace: $trace.</p>$parties</section>
</main>
<script>$plotly</script>
<script id="figures" type="application/json">$figures</script>
<script>
const figures = JSON.parse(document.getElementById("figures").textContent);
const base = { margin: { t: 60, r: 10, b: 50, l: 60 }, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
               legend: { orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom", traceorder: "normal" },
               font: { family: "system-ui, sans-serif", size: 12 } };
for (const [id, figure] of Object.entries(figures)) {
  Plotly.newPlot(id, figure.data, Object.assign({}, base, figure.layout), { displaylogo: false, responsive: true });
}
</script>
</body></html>
""")


def report_command(
    run: Annotated[str, typer.Argument(help="Run id or name (a name means its latest run).")],
    server: Annotated[
        str, typer.Option("--server", "-s", envvar="TRAICE_SERVER_URL", help="URL of the TRAICE server.")
    ] = DEFAULT_SERVER,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (default: report.html; JSON without --out goes to stdout)."),
    ] = None,
    format: Annotated[
        ReportFormat | None,
        typer.Option("--format", "-f", help="html or json (default: json if --out ends in .json, else html)."),
    ] = None,
) -> None:
    """Write a self-contained report of a run (charts, breakdown by component, assumptions) that opens offline."""
    chosen = format or (ReportFormat.json if out is not None and out.suffix == ".json" else ReportFormat.html)
    try:
        report = build_report(server, run)
    except ReportError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(exc.exit_code) from None
    if chosen is ReportFormat.json and out is None:
        typer.echo(json.dumps(report, indent=1))
        return
    path = out or Path("report.html")
    try:
        path.write_text(json.dumps(report, indent=1) if chosen is ReportFormat.json else render_html(report),
                        encoding="utf-8")
    except OSError as exc:
        typer.secho(f"cannot write {path}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    size = path.stat().st_size
    typer.echo(f"wrote {path} ({size / 1e6:.1f} MB)" if size >= 1e6 else f"wrote {path} ({size / 1e3:.0f} kB)")
