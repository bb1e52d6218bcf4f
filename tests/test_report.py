"""``traice report``: a run's self-contained HTML and JSON report, from a real server that real workers fed."""

from __future__ import annotations

import html
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ARTIFACTS
from fastapi.responses import JSONResponse

from traice import TraiceClient
from traice.equivalents import equivalents
from traice.server import ServerThread, create_app

with warnings.catch_warnings():
    # typer 0.20 imports names that click 8.3+ deprecates; pytest turns that warning into an error at import
    warnings.simplefilter("ignore", DeprecationWarning)
    import typer
    from typer.testing import CliRunner

    from traice.report import build_report, render_html, report_command

EVIL = '<script>alert("pwned")</script>'  # a client whose name would run as code if it were not escaped
COMPONENTS = ("compute", "upload", "download", "server")
PLOTLY_JS = (resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


@dataclass
class Recorded:
    url: str
    run_id: int  # the latest run named "rep"
    old_run_id: int  # an earlier run with the same name
    forecasts: dict[int, Any]  # what the stand-in forecast endpoint answers, by run id (404 for the others)


def _burn(seconds: float = 0.15) -> None:
    """CPU work, so that each round measures some energy."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1


def _wait_until_finished(url: str, run_id: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        clients = httpx.get(f"{url}/api/runs/{run_id}/clients").json()
        if httpx.get(f"{url}/api/runs/{run_id}").json()["status"] == "finished" and all(
            c["status"] == "finished" for c in clients
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish")


def _latest_id(url: str) -> int:
    return max(r["id"] for r in httpx.get(f"{url}/api/runs").json())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    app = create_app(database_url=f"sqlite:///{tmp_path_factory.mktemp('report') / 't.db'}")
    forecasts: dict[int, Any] = {}

    # Stands in for GET /api/runs/{id}/forecast (which is newer than the report, and may be absent): first in
    # the routes, so it wins over the real one; it answers for the runs in `forecasts` and is 404 for the others.
    def forecast(run_id: int) -> Any:
        if run_id not in forecasts:
            return JSONResponse({"error": {"code": "not_found", "message": "no forecast"}}, status_code=404)
        return forecasts[run_id]

    app.add_api_route("/api/runs/{run_id}/forecast", forecast, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())
    with ServerThread(app) as server:
        with TraiceClient(server.url, run="rep", node_id="old", country_iso_code="FRA") as old:
            _burn()
            old.update(1, 0.3, 2.0, bytes_up=10**6, bytes_down=10**6)
        old_run_id = _latest_id(server.url)
        _wait_until_finished(server.url, old_run_id)

        with (  # the FL server first, so that it says bye (and ends the run) after the clients
            TraiceClient(server.url, run="rep", node_id="srv", role="server", country_iso_code="FRA") as fl_server,
            TraiceClient(server.url, run="rep", node_id="c1", country_iso_code="FRA") as c1,
            TraiceClient(server.url, run="rep", node_id=EVIL, country_iso_code="DEU") as c2,
        ):
            for rnd in (1, 2, 3):
                _burn()
                c1.update(rnd, 0.5 + rnd / 10, 1.0 / rnd, bytes_up=10**6, bytes_down=2 * 10**6)
                c2.update(rnd, 0.4 + rnd / 10, 1.2 / rnd, bytes_up=10**6, bytes_down=2 * 10**6)
                fl_server.update(rnd, 0.6 + rnd / 10, 0.9 / rnd)  # the global model's accuracy
        run_id = _latest_id(server.url)
        _wait_until_finished(server.url, run_id)
        total = httpx.get(f"{server.url}/api/runs/{run_id}").json()["emissions_kg"]
        forecasts[run_id] = _forecast_answer(total, rounds_planned=4, emissions_kg_at_end=total * 4 / 3)
        yield Recorded(server.url, run_id, old_run_id, forecasts)


def _forecast_answer(spent_kg: float, rounds_planned: int, emissions_kg_at_end: float) -> dict[str, Any]:
    """An answer with the fields of traice.forecast.forecast() for 3 rounds done."""
    return {"rounds_done": 3, "rounds_planned": rounds_planned, "energy_kwh_so_far": 0.0015,
            "emissions_kg_so_far": spent_kg, "energy_kwh_at_end": 0.002, "emissions_kg_at_end": emissions_kg_at_end,
            "expected_error": 0.1, "energy_kwh_interval": [0.0018, 0.0022], "carbontracker_energy_kwh_at_end": 0.003,
            "method": "stand-in", "target": None}


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """As in traice.cli: a group, so the command is called by its name."""

    app.command("report")(report_command)
    return app


@pytest.fixture(scope="module")
def report_html(recorded: Recorded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    result = CliRunner().invoke(_cli(), ["report", "rep", "--server", recorded.url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    return out


# --------------------------------------------------------------------------- the data


def test_the_breakdown_adds_up_to_the_run_total_and_matches_the_api(recorded: Recorded) -> None:
    api = httpx.get(f"{recorded.url}/api/runs/{recorded.run_id}").json()

    report = build_report(recorded.url, "rep")

    breakdown = report["breakdown"]
    assert report["run"]["id"] == recorded.run_id and report["run"]["name"] == "rep"
    for component in COMPONENTS:
        assert breakdown[component]["energy_kwh"] == api["by_component"][component]["energy_kwh"]
        assert breakdown[component]["emissions_kg"] == api["by_component"][component]["emissions_kg"]
        assert breakdown[component]["emissions_kg"] > 0, component  # CPU work, bytes and an FL server
    assert sum(b["energy_kwh"] for b in breakdown.values()) == pytest.approx(api["energy_kwh"], rel=1e-9)
    assert sum(b["emissions_kg"] for b in breakdown.values()) == pytest.approx(api["emissions_kg"], rel=1e-9)
    assert sum(b["emissions_share_pct"] for b in breakdown.values()) == pytest.approx(100.0)
    assert sum(c["emissions_kg"] for c in report["clients"]) == pytest.approx(api["emissions_kg"], rel=1e-9)
    assert {c["node_id"] for c in report["clients"]} == {"c1", EVIL, "srv"}


def test_rounds_use_the_global_models_accuracy_and_add_up(recorded: Recorded) -> None:
    api_rounds = httpx.get(f"{recorded.url}/api/runs/{recorded.run_id}/rounds").json()

    report = build_report(recorded.url, str(recorded.run_id))

    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["model_accuracy"] for r in rounds] == pytest.approx([0.7, 0.8, 0.9])  # the FL server's
    assert [r["model_accuracy"] for r in rounds] == pytest.approx([r["server_accuracy"] for r in api_rounds])
    assert report["run"]["final_accuracy"] == pytest.approx(0.9)
    assert rounds[-1]["cumulative_emissions_kg"] == pytest.approx(sum(r["emissions_kg"] for r in api_rounds))
    assert rounds[-1]["cumulative_emissions_kg"] == pytest.approx(report["run"]["emissions_kg"], rel=1e-6)


def test_a_name_means_its_latest_run_and_an_id_any_run(recorded: Recorded) -> None:
    latest = build_report(recorded.url, "rep")
    old = build_report(recorded.url, str(recorded.old_run_id))

    assert latest["run"]["id"] == recorded.run_id != recorded.old_run_id
    assert (old["run"]["id"], old["run"]["name"], old["run"]["rounds"]) == (recorded.old_run_id, "rep", 1)


def test_assumptions_and_equivalents_come_with_their_sources(recorded: Recorded) -> None:
    report = build_report(recorded.url, "rep")

    assumptions = report["assumptions"]
    assert assumptions["network_kwh_per_gb"] == 0.01 and "Tapp" in assumptions["network_source"]
    fra = next(p for p in assumptions["parties"] if p["node_id"] == "c1")
    assert (fra["country_iso_code"], fra["intensity_source"]) == ("FRA", "codecarbon global_energy_mix 2023")
    assert fra["intensity_g_per_kwh"] == pytest.approx(56.0, abs=0.1)  # CARBON_MODEL.md: FRA 56.0
    total = report["run"]["emissions_kg"]
    for equivalent in report["equivalents"]:
        assert equivalent["value"] == pytest.approx(total / equivalent["kg_co2_per_unit"])
        assert equivalent["source"]


def test_the_forecast_is_used_only_when_the_server_answers_one(recorded: Recorded) -> None:
    with_forecast = build_report(recorded.url, "rep")  # forecast for 4 planned rounds; the run stopped after 3
    without = build_report(recorded.url, str(recorded.old_run_id))  # the endpoint is 404 for this run

    forecast = with_forecast["forecast"]
    total = with_forecast["run"]["emissions_kg"]
    # a line from what the 3 rounds spent to the forecast total after the 4 planned
    assert [(p["round"], p["emissions_kg"]) for p in forecast["points"]] == [
        (3, pytest.approx(total)), (4, pytest.approx(total * 4 / 3))]
    assert forecast["error_pct"] is None  # a forecast for 4 rounds is no error against 3
    assert without["forecast"] is None
    page = render_html(with_forecast)
    assert 'id="forecast"' in page and "(the run ended after 3 rounds)" in page
    assert "Carbontracker&#x27;s rounds × first round gives 3 Wh" in page
    assert 'id="forecast"' not in render_html(without)


def test_the_forecast_error_against_the_actual_total(recorded: Recorded) -> None:
    saved = recorded.forecasts[recorded.run_id]
    total = saved["emissions_kg_so_far"]
    recorded.forecasts[recorded.run_id] = _forecast_answer(total, rounds_planned=3, emissions_kg_at_end=total * 1.1)
    try:
        report = build_report(recorded.url, "rep")
    finally:
        recorded.forecasts[recorded.run_id] = saved

    assert report["forecast"]["error_pct"] == pytest.approx(10.0)  # it said 1.1 x what the 3 rounds emitted
    assert "+10.0 % against the actual total" in render_html(report)


def test_equivalents_arithmetic() -> None:
    by_key = {q["key"]: q for q in equivalents(0.5)}

    assert by_key["car_km_eea"]["value"] == pytest.approx(4.6904, rel=1e-4)  # 0.5 kg / 0.1066 kg per km
    assert by_key["car_miles_epa"]["value"] == pytest.approx(1.25)  # 0.5 kg / 0.400 kg per mile
    assert by_key["smartphone_charges"]["value"] == pytest.approx(40.3226, rel=1e-4)  # 0.5 kg / 0.0124 kg
    assert "EEA" in by_key["car_km_eea"]["source"] and "106.6 g CO2/km" in by_key["car_km_eea"]["source"]
    assert "EPA-420-F-23-014" in by_key["car_miles_epa"]["source"]
    assert "2024 edition" in by_key["smartphone_charges"]["source"]
    assert [q["value"] for q in equivalents(0.0)] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- the HTML file


def test_the_html_is_self_contained_and_escaped(recorded: Recorded, report_html: Path) -> None:
    page = report_html.read_text(encoding="utf-8")
    report = build_report(recorded.url, "rep")

    assert PLOTLY_JS in page  # inlined, whole
    ours = page.replace(PLOTLY_JS, "")  # the bundle's own strings (map-tile attributions) are not loads
    for loader in ('src="http', "src='http", 'href="http', "href='http", "url(http", "@import", "<link"):
        assert loader not in ours, loader
    assert "<script src" not in ours
    assert html.escape(EVIL) in page and EVIL not in page
    for component in COMPONENTS:
        assert f"<td>{component}</td>" in page
    fra = next(p for p in report["assumptions"]["parties"] if p["node_id"] == "c1")
    assert (f"<td>c1</td><td>client</td><td>FRA</td><td>–</td><td>{fra['intensity_g_per_kwh']:.1f}</td>"
            f"<td>{html.escape(fra['intensity_source'])}</td>") in page
    assert html.escape(report["assumptions"]["network_source"]) in page
    for equivalent in report["equivalents"]:
        assert html.escape(equivalent["source"]) in page
        assert f"{equivalent['unit']}</td><td>{html.escape(equivalent['label'])}</td>" in page
    assert report_html.stat().st_size > len(PLOTLY_JS)


def test_the_report_renders_in_a_browser(report_html: Path, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    dialogs: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda request: requests.append(request.url))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    page.goto(report_html.as_uri())
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6", timeout=15_000)
    charts = page.locator(".js-plotly-plot").count()
    client_ticks = page.locator("#clients .xtick text").all_text_contents()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.close()

    assert charts == 6  # breakdown, trade-off, forecast, clients, energy and emissions per round
    assert errors == [] and dialogs == []
    assert requests == [report_html.as_uri()]  # nothing loaded from anywhere else
    assert EVIL in client_ticks  # shown as text


# --------------------------------------------------------------------------- the command


def test_json_to_stdout_or_to_a_json_file(recorded: Recorded, tmp_path: Path) -> None:
    runner = CliRunner()

    to_stdout = runner.invoke(_cli(), ["report", "rep", "--format", "json"], env={"TRAICE_SERVER_URL": recorded.url})
    to_file = runner.invoke(_cli(), ["report", "rep", "-s", recorded.url, "-o", str(tmp_path / "r.json")])

    assert to_stdout.exit_code == 0, to_stdout.output
    report = json.loads(to_stdout.stdout)
    assert report["run"]["id"] == recorded.run_id and set(report["breakdown"]) == set(COMPONENTS)
    assert to_file.exit_code == 0, to_file.output
    assert json.loads((tmp_path / "r.json").read_text())["run"]["id"] == recorded.run_id


def test_unknown_run_exits_1_and_unreachable_server_exits_2(recorded: Recorded, tmp_path: Path) -> None:
    runner = CliRunner()

    by_name = runner.invoke(_cli(), ["report", "no-such-run", "-s", recorded.url, "-o", str(tmp_path / "a.html")])
    by_id = runner.invoke(_cli(), ["report", "999", "-s", recorded.url, "-o", str(tmp_path / "b.html")])
    down = runner.invoke(_cli(), ["report", "rep", "-s", "http://127.0.0.1:9", "-o", str(tmp_path / "c.html")])

    assert by_name.exit_code == 1 and "no run 'no-such-run'" in by_name.stderr
    assert by_id.exit_code == 1 and "run 999 does not exist" in by_id.stderr
    assert down.exit_code == 2 and "cannot reach the TRAICE server" in down.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
