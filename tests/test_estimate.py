"""``traice estimate``: the arithmetic by hand, regions, inputs, the command, and a pilot run on a real server."""

from __future__ import annotations

import json
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from traice import TraiceClient
from traice.carbon import intensity_for
from traice.server import ServerThread, create_app

with warnings.catch_warnings():  # typer 0.20 imports names that click 8.5 deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    import typer
    from typer.testing import CliRunner

    from traice.estimate import EstimateParams, estimate, estimate_command, parse_region, pilot_from_rows

COMPONENTS = ("compute", "upload", "download", "server")


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A stand-in for the traice app."""

    app.command("estimate")(estimate_command)
    return app


def _run(*args: str) -> Any:
    return CliRunner().invoke(_app(), ["estimate", *args])


def _assumption(data: dict[str, Any], name: str) -> Any:
    return next(a["value"] for a in data["assumptions"] if a["name"] == name)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


# --------------------------------------------------------------------------- arithmetic


def test_every_component_matches_a_hand_computation() -> None:
    fra = intensity_for("FRA").g_per_kwh
    params = EstimateParams(
        clients_per_round=4, rounds=10, model_bytes=50_000_000, update_compression=0.5,
        local_compute_s_per_round=120, device_power_w=20, client_regions=("FRA",), server_region=None,
        network_kwh_per_gb=0.02, client_pue=1.5, server_pue=1.2, server_power_w=50, aggregation_s=2,
    )
    e = estimate(params)

    # compute: 4 clients x 120 s x 20 W x PUE 1.5 = 14 400 J = 0.004 kWh per round
    # download: 4 x 50 MB = 0.2 GB x 0.02 kWh/GB = 0.004 kWh; upload: half of it (compression 0.5)
    # server: 50 W x PUE 1.2 x (120 s + 2 s) = 7 320 J = 0.002033... kWh, at the world average 475 g/kWh
    expected = {"compute": (0.004, fra), "download": (0.004, fra), "upload": (0.002, fra),
                "server": (7320 / 3.6e6, 475.0)}
    for name, (kwh, g_per_kwh) in expected.items():
        assert e.per_round.by_component[name].energy_kwh == pytest.approx(kwh, rel=1e-12)
        assert e.per_round.by_component[name].emissions_kg == pytest.approx(kwh * g_per_kwh / 1000, rel=1e-12)
        assert e.by_component[name].energy_kwh == pytest.approx(10 * kwh, rel=1e-12)
        assert e.by_component[name].emissions_kg == pytest.approx(10 * kwh * g_per_kwh / 1000, rel=1e-12)
    assert e.energy_kwh == pytest.approx(10 * (0.004 + 0.004 + 0.002 + 7320 / 3.6e6), rel=1e-12)
    total_g = 10 * ((0.004 + 0.004 + 0.002) * fra + 7320 / 3.6e6 * 475.0) / 1000
    assert e.emissions_kg == pytest.approx(total_g, rel=1e-12)
    assert e.by_component["server"].share == pytest.approx(10 * 7320 / 3.6e6 * 475.0 / 1000 / total_g, rel=1e-12)


def test_components_add_up_to_the_total_exactly() -> None:
    e = estimate(EstimateParams(clients_per_round=7, rounds=13, model_bytes=123_457, local_compute_s_per_round=3.3,
                                client_regions=("DEU", "IND", "USA:CA"), server_region="GBR", client_pue=1.1))
    for breakdown in (e, e.per_round):
        parts = [breakdown.by_component[name] for name in COMPONENTS]
        assert list(breakdown.by_component) == list(COMPONENTS)
        assert sum(c.energy_kwh for c in parts) == breakdown.energy_kwh
        assert sum(c.emissions_kg for c in parts) == breakdown.emissions_kg
        assert sum(c.share for c in parts) == pytest.approx(1.0, rel=1e-12)


def test_defaults_are_the_documented_ones_and_named_with_their_sources() -> None:
    e = estimate(EstimateParams(clients_per_round=1, rounds=1, model_bytes=1_000_000_000, local_compute_s_per_round=59))

    # 1 GB each way x 0.01 kWh/GB; 59 s x 15 W; server 45 W x (59 s + 1 s); everything at 475 g/kWh
    assert e.per_round.by_component["download"].energy_kwh == pytest.approx(0.01, rel=1e-12)
    assert e.per_round.by_component["upload"].energy_kwh == pytest.approx(0.01, rel=1e-12)
    assert e.per_round.by_component["compute"].energy_kwh == pytest.approx(59 * 15 / 3.6e6, rel=1e-12)
    assert e.per_round.by_component["server"].energy_kwh == pytest.approx(45 * 60 / 3.6e6, rel=1e-12)
    assert e.emissions_kg == pytest.approx(e.energy_kwh * 0.475, rel=1e-12)
    sources = {a.name: a.source for a in e.assumptions}
    assert "Tapp et al. 2026" in sources["network energy intensity"]
    assert "Green FL (Yousefpour et al. 2023)" in sources["server power"]
    assert "assumption" in sources["device power"]
    assert sources["client grid world"] == intensity_for(None).source


# --------------------------------------------------------------------------- regions


def test_clients_spread_evenly_over_their_regions() -> None:
    regions = ("FRA", "USA:california", "CHN")
    e = estimate(EstimateParams(clients_per_round=3, rounds=2, model_bytes=10, local_compute_s_per_round=10,
                                client_regions=regions, server_region="fra"))
    values = [intensity_for("FRA").g_per_kwh, intensity_for("USA", "california").g_per_kwh,
              intensity_for("CHN").g_per_kwh]
    compute = e.by_component["compute"]
    assert compute.emissions_kg == pytest.approx(compute.energy_kwh * statistics.fmean(values) / 1000, rel=1e-12)
    server = e.by_component["server"]
    assert server.emissions_kg == pytest.approx(server.energy_kwh * intensity_for("FRA").g_per_kwh / 1000, rel=1e-12)
    by_name = {a.name: a for a in e.assumptions}
    assert by_name["client grid USA:california"].source == "EPA eGRID 2023 (codecarbon)"
    assert values[1] != intensity_for("USA").g_per_kwh  # the state, not the country


def test_region_parsing_and_unknown_places() -> None:
    assert parse_region("FRA") == ("FRA", None)
    assert parse_region("usa:california") == ("USA", "california")
    assert parse_region(None) == parse_region("world") == (None, None)
    with pytest.raises(ValueError, match="unknown country"):
        estimate(EstimateParams(clients_per_round=1, rounds=1, model_bytes=1, local_compute_s_per_round=1,
                                client_regions=("XYZ",)))
    with pytest.raises(ValueError, match="bad region"):
        parse_region(":california")
    e = estimate(EstimateParams(clients_per_round=1, rounds=1, model_bytes=1, local_compute_s_per_round=1,
                                client_regions=("USA:atlantis",)))
    (grid,) = [a for a in e.assumptions if a.name == "client grid USA:atlantis"]
    assert grid.value == intensity_for("USA").g_per_kwh and "country average" in grid.source


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "change",
    [{"clients_per_round": 0}, {"rounds": -1}, {"model_bytes": 0}, {"local_compute_s_per_round": 0.0},
     {"device_power_w": -15.0}, {"network_kwh_per_gb": float("nan")}, {"update_compression": 0.0},
     {"client_pue": 0.9}, {"server_pue": float("inf")}, {"server_power_w": -1.0}, {"aggregation_s": -0.5},
     {"model_bytes": None}, {"local_compute_s_per_round": None}],
)
def test_invalid_inputs_are_refused(change: dict[str, Any]) -> None:
    params: dict[str, Any] = {"clients_per_round": 2, "rounds": 3, "model_bytes": 100, "local_compute_s_per_round": 5.0}
    with pytest.raises(ValueError):
        EstimateParams(**{**params, **change})


def test_the_model_size_can_come_from_a_file(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"\0" * 12_345)

    result = _run("--rounds", "2", "--clients-per-round", "3", "--model-file", str(model), "--local-seconds", "1",
                  "--format", "json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0
    assert _assumption(data, "download per client per round") == 12_345
    assert data["per_round"]["by_component"]["download"]["energy_kwh"] == pytest.approx(3 * 12_345 / 1e9 * 0.01)

    both = _run("--rounds", "2", "--clients-per-round", "3", "--model-file", str(model), "--model-bytes", "5",
                "--local-seconds", "1")
    assert both.exit_code == 2 and "not both" in both.output
    missing = _run("--rounds", "2", "--clients-per-round", "3", "--model-file", str(tmp_path / "none.pt"),
                   "--local-seconds", "1")
    assert missing.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--device-power-w", "-1"], "device_power_w"), (["--client-region", "XYZ"], "unknown country"),
     (["--server-region", "QQQ"], "unknown country"), (["--client-pue", "0.5"], "client_pue"),
     (["--rounds", "0"], "rounds"), ([], "--local-seconds")],
)
def test_the_command_refuses_bad_inputs_with_exit_code_2(args: list[str], message: str) -> None:
    base = ["--rounds", "5", "--clients-per-round", "2", "--model-bytes", "1000"]
    if args:
        base += ["--local-seconds", "3"]
    result = _run(*base, *args)
    assert result.exit_code == 2
    assert message in result.output


# --------------------------------------------------------------------------- the command


def test_json_output_is_the_estimate_and_the_table_names_every_component() -> None:
    args = ["--rounds", "100", "--clients-per-round", "10", "--model-bytes", "44000000", "--local-seconds", "30",
            "--client-region", "FRA", "--client-region", "USA:california", "--server-region", "DEU"]
    as_json = _run(*args, "--format", "json")
    table = _run(*args)

    expected = estimate(EstimateParams(clients_per_round=10, rounds=100, model_bytes=44_000_000,
                                       local_compute_s_per_round=30, client_regions=("FRA", "USA:california"),
                                       server_region="DEU"))
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == json.loads(json.dumps(expected.to_dict()))
    data = json.loads(as_json.stdout)
    assert set(data) == {"energy_kwh", "emissions_kg", "by_component", "rounds", "clients_per_round", "per_round",
                         "assumptions"}
    assert set(data["by_component"]["compute"]) == {"energy_kwh", "emissions_kg", "share"}
    assert table.exit_code == 0, table.output
    for word in (*COMPONENTS, "total", "Assumptions", "Tapp et al. 2026", "EPA eGRID", "%"):
        assert word in table.stdout


def test_help_explains_every_option() -> None:
    result = _run("--help")
    for option in ("--clients-per-round", "--rounds", "--model-bytes", "--model-file", "--local-seconds",
                   "--device-power-w", "--client-region", "--server-region", "--network-kwh-per-gb", "--client-pue",
                   "--server-pue", "--server-power-w", "--pilot-run", "--server", "--format"):
        assert option in result.stdout


# --------------------------------------------------------------------------- pilot runs


def _row(round_: int, node: str, energy_kwh: float, role: str = "client") -> dict[str, Any]:
    return {"round": round_, "node_id": node, "role": role, "compute_energy_kwh": energy_kwh if role == "client" else 0,
            "server_energy_kwh": energy_kwh if role == "server" else 0, "duration_s": 2.0 * round_,
            "bytes_up": 10, "bytes_down": 20}


def test_a_costly_first_round_is_left_out_of_a_pilot() -> None:
    costly = [_row(1, "a", 10.0), _row(1, "b", 10.0), _row(2, "a", 1.0), _row(2, "b", 1.4), _row(3, "a", 1.2),
              _row(1, "s", 5.0, "server"), _row(2, "s", 0.5, "server"), _row(3, "s", 0.7, "server")]
    pilot = pilot_from_rows("p", costly, {"a": 1.0, "b": 1.0, "s": 1.0})
    assert pilot.rounds_used == (2, 3)
    assert pilot.compute_energy_kwh_per_client_round == pytest.approx((1.0 + 1.4 + 1.2) / 3)
    assert pilot.server_energy_kwh_per_round == pytest.approx((0.5 + 0.7) / 2)
    assert pilot.duration_s_per_round == pytest.approx((4.0 + 6.0) / 2)

    # round 1 at 2.0 is not more than 2 x the median (1.1) of later rounds: it counts
    usual = [_row(1, "a", 2.0), _row(2, "a", 1.0), _row(3, "a", 1.2)]
    assert pilot_from_rows("p", usual, {}).compute_energy_kwh_per_client_round == pytest.approx(4.2 / 3)


def test_an_estimate_from_a_pilot_run_on_a_real_server(tmp_path: Path) -> None:
    with ServerThread(create_app(database_url=f"sqlite:///{tmp_path / 't.db'}")) as server:
        with TraiceClient(server.url, run="pilot", node_id="c1") as c:
            _busy(0.3)
            c.update(1, 0.5, 1.0, bytes_up=1000, bytes_down=2000)
            _busy(0.3)
            c.update(2, 0.6, 0.9, bytes_up=1000, bytes_down=2000)
        (run,) = httpx.get(f"{server.url}/api/runs").json()
        rows = httpx.get(f"{server.url}/api/runs/{run['id']}/rounds/clients").json()

        result = _run("--pilot-run", "pilot", "--server", server.url, "--rounds", "20", "--clients-per-round", "5",
                      "--format", "json")
        unknown = _run("--pilot-run", "nope", "--server", server.url, "--rounds", "20", "--clients-per-round", "5")

    energy = {r["round"]: r["compute_energy_kwh"] for r in rows if r["role"] == "client"}
    assert sorted(energy) == [1, 2] and all(v > 0 for v in energy.values())
    used = [energy[2]] if energy[1] > 2 * energy[2] else [energy[1], energy[2]]  # start-up cost left out
    per_client_kwh = sum(used) / len(used)

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert _assumption(data, "compute energy per client per round") == pytest.approx(per_client_kwh, rel=1e-12)
    assert data["by_component"]["compute"]["energy_kwh"] == pytest.approx(20 * 5 * per_client_kwh, rel=1e-12)
    assert data["per_round"]["by_component"]["upload"]["energy_kwh"] == pytest.approx(5 * 1000 / 1e9 * 0.01)
    assert data["per_round"]["by_component"]["download"]["energy_kwh"] == pytest.approx(5 * 2000 / 1e9 * 0.01)
    assert unknown.exit_code == 2 and "no run 'nope'" in unknown.output


def test_an_unreachable_pilot_server_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    result = _run("--pilot-run", "pilot", "--server", f"http://127.0.0.1:{port}", "--rounds", "2",
                  "--clients-per-round", "2")
    assert result.exit_code == 2
    assert "cannot reach the TRAICE server" in result.output
