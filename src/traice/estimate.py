"""``traice estimate``: the expected energy and emissions of an FL training, before it runs.

Per round, Green FL's breakdown (Yousefpour et al. 2023): client ``compute``, ``upload`` and ``download``
(bytes x network energy intensity, at the clients' grid) and the FL ``server``. Defaults and sources:
``../shared/CARBON_MODEL.md``. A pilot run on a TRAICE server can replace assumed power, time and sizes.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from .carbon import NETWORK_KWH_PER_GB, Intensity, emissions_kg, intensity_for, network_energy_kwh
from .rest import admin_headers

COMPONENTS = ("compute", "upload", "download", "server")
DEVICE_POWER_W = 15.0  # an assumption, not a measurement
SERVER_POWER_W = 45.0
AGGREGATION_S = 1.0
DEVICE_SOURCE = "assumption (laptop-class CPU under load)"
SERVER_SOURCE = "Green FL (Yousefpour et al. 2023): aggregator at ~1 % utilisation"
NETWORK_SOURCE = "Tapp et al. 2026; range 0.005-0.06 kWh/GB for sensitivity (Aslan et al. 2018)"
SERVER_PUE_SOURCE = "TRAICE default (Green FL measured 1.09; Uptime 2023 average 1.58)"
J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Pilot:
    """What a pilot run measured, per client and round (energies as reported: the pilot's PUE included)."""

    run: str
    compute_energy_kwh_per_client_round: float
    client_pue: float
    bytes_up_per_client_round: float | None
    bytes_down_per_client_round: float | None
    duration_s_per_round: float  # the slowest client's time
    server_energy_kwh_per_round: float | None  # None: the pilot did not track its FL server
    server_pue: float
    rounds_used: tuple[int, ...]


@dataclass(frozen=True)
class EstimateParams:
    """Inputs of :func:`estimate`. Regions: ``"FRA"``, ``"USA:california"``; none is the world average.
    A PUE of None is the pilot's (with a pilot) or 1.0; explicit values win over the pilot's."""

    clients_per_round: int
    rounds: int
    model_bytes: int | None = None
    model_bytes_source: str = "given"
    update_compression: float = 1.0  # update size / model size (with a pilot: / the pilot's upload)
    local_compute_s_per_round: float | None = None
    device_power_w: float = DEVICE_POWER_W
    client_regions: tuple[str, ...] = ()
    server_region: str | None = None
    network_kwh_per_gb: float = NETWORK_KWH_PER_GB
    client_pue: float | None = None
    server_pue: float | None = None
    server_power_w: float = SERVER_POWER_W
    aggregation_s: float = AGGREGATION_S
    pilot: Pilot | None = None

    def __post_init__(self) -> None:
        rules: list[tuple[str, Callable[[float], bool], tuple[str, ...]]] = [
            ("at least 1", lambda v: v >= 1, ("clients_per_round", "rounds", "model_bytes", "client_pue",
                                              "server_pue")),
            ("a positive number", lambda v: v > 0, ("update_compression", "local_compute_s_per_round",
                                                    "device_power_w", "network_kwh_per_gb")),
            ("a number >= 0", lambda v: v >= 0, ("server_power_w", "aggregation_s")),
        ]
        for rule, ok, names in rules:
            for name in names:
                value = getattr(self, name)
                if value is not None and not (math.isfinite(value) and ok(value)):
                    raise ValueError(f"{name} must be {rule}, not {value}")
        if self.model_bytes is None and self.pilot is None:
            raise ValueError("give the model size (--model-bytes or --model-file) or a pilot run")
        if self.local_compute_s_per_round is None and self.pilot is None:
            raise ValueError("give the local compute time per round (--local-seconds) or a pilot run")


@dataclass(frozen=True)
class Component:
    energy_kwh: float
    emissions_kg: float
    share: float  # of the emissions (Green FL reports carbon shares)


@dataclass(frozen=True)
class Breakdown:
    energy_kwh: float
    emissions_kg: float
    by_component: dict[str, Component]


@dataclass(frozen=True)
class Assumption:
    name: str
    value: float | int | str
    unit: str
    source: str


@dataclass(frozen=True)
class Estimate(Breakdown):
    """Totals over the training; ``per_round`` for one round; every value used, with its source."""

    rounds: int
    clients_per_round: int
    per_round: Breakdown
    assumptions: list[Assumption]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_region(spec: str | None) -> tuple[str | None, str | None]:
    """``"FRA"`` -> ("FRA", None); ``"USA:california"`` -> ("USA", "california"); None, "world" -> (None, None)."""
    if spec is None or spec.strip().lower() in ("", "world"):
        return None, None
    country, _, region = spec.partition(":")
    if not country.strip():
        raise ValueError(f"bad region {spec!r}: use an ISO alpha-3 country code, optionally ':region'")
    return country.strip().upper(), region.strip() or None


def grid(spec: str | None) -> tuple[Intensity, str]:
    """The annual intensity at ``spec`` and its source; a region codecarbon does not know is said so."""
    country, region = parse_region(spec)
    try:
        found = intensity_for(country, region)
    except ValueError as exc:
        raise ValueError(f"region {spec!r}: {exc}") from None
    source = found.source
    if region and source == intensity_for(country).source:
        source += f" (region {region!r} not in codecarbon's data: country average)"
    return found, source


def _breakdown(parts: dict[str, tuple[float, float]]) -> Breakdown:
    energy_kwh, total_kg = sum(e for e, _ in parts.values()), sum(g for _, g in parts.values())
    return Breakdown(energy_kwh, total_kg,
                     {k: Component(e, g, g / total_kg if total_kg else 0.0) for k, (e, g) in parts.items()})


def _given(value: float, default: float, source: str) -> str:
    return source if value == default else "given"


def estimate(params: EstimateParams) -> Estimate:
    """Expected energy and emissions per round and in total; components add up to the totals."""
    p, pilot, n = params, params.pilot, params.clients_per_round
    a = [Assumption("rounds", p.rounds, "", "given"), Assumption("clients per round", n, "", "given")]
    grids = [(spec or "world", *grid(spec)) for spec in (p.client_regions or (None,))]
    client_g = statistics.fmean(i.g_per_kwh for _, i, _ in grids)  # clients spread evenly over the regions
    a += [Assumption(f"client grid {label}", i.g_per_kwh, "g/kWh", src) for label, i, src in grids]
    if len(grids) > 1:
        a.append(Assumption("client grid mean", client_g, "g/kWh", "clients spread evenly over the regions"))
    server_i, server_src = grid(p.server_region)
    a.append(Assumption(f"server grid {p.server_region or 'world'}", server_i.g_per_kwh, "g/kWh", server_src))

    client_pue = p.client_pue or (pilot.client_pue if pilot else 1.0)
    if p.local_compute_s_per_round is not None or pilot is None:
        wall_s = p.local_compute_s_per_round or 0.0
        device_kwh = wall_s * p.device_power_w / J_PER_KWH * client_pue
        a += [Assumption("local compute per round", wall_s, "s", "given"), Assumption(
            "device power", p.device_power_w, "W", _given(p.device_power_w, DEVICE_POWER_W, DEVICE_SOURCE))]
    else:
        wall_s = pilot.duration_s_per_round
        used = f"pilot run {pilot.run}, rounds {', '.join(map(str, pilot.rounds_used))}"
        device_kwh = pilot.compute_energy_kwh_per_client_round * (client_pue / pilot.client_pue)
        a += [Assumption("compute energy per client per round", pilot.compute_energy_kwh_per_client_round, "kWh",
                         f"measured: {used} (pilot PUE {pilot.client_pue:g} included)"),
              Assumption("round time (slowest client)", wall_s, "s", f"measured: {used}")]
    a.append(Assumption("client PUE", client_pue, "",
                        "given" if p.client_pue else "pilot run's" if pilot else "codecarbon default"))

    if p.model_bytes is not None or pilot is None:
        down_b = up_b = float(p.model_bytes or 0)
        bytes_src = p.model_bytes_source
    elif pilot.bytes_down_per_client_round is None or pilot.bytes_up_per_client_round is None:
        raise ValueError(f"pilot run {pilot.run} reported no bytes sent or received: give --model-bytes")
    else:
        down_b, up_b = pilot.bytes_down_per_client_round, pilot.bytes_up_per_client_round
        bytes_src = f"measured: pilot run {pilot.run}"
    up_b *= p.update_compression
    a += [Assumption("download per client per round", down_b, "bytes", bytes_src),
          Assumption("upload per client per round", up_b, "bytes",
                     f"{bytes_src} x compression {p.update_compression:g}"),
          Assumption("network energy intensity", p.network_kwh_per_gb, "kWh/GB",
                     _given(p.network_kwh_per_gb, NETWORK_KWH_PER_GB, NETWORK_SOURCE))]

    if pilot is not None and pilot.server_energy_kwh_per_round is not None:
        server_pue = p.server_pue or pilot.server_pue
        server_kwh = pilot.server_energy_kwh_per_round * (server_pue / pilot.server_pue)
        a.append(Assumption("server energy per round", pilot.server_energy_kwh_per_round, "kWh",
                            f"measured: pilot run {pilot.run} (pilot PUE {pilot.server_pue:g} included)"))
        pue_src = "given" if p.server_pue else "pilot run's"
    else:
        server_pue, pue_src = p.server_pue or 1.0, "given" if p.server_pue else SERVER_PUE_SOURCE
        server_kwh = p.server_power_w * server_pue * (wall_s + p.aggregation_s) / J_PER_KWH
        a += [Assumption("server power", p.server_power_w, "W",
                         _given(p.server_power_w, SERVER_POWER_W, SERVER_SOURCE)),
              Assumption("aggregation time per round", p.aggregation_s, "s",
                         _given(p.aggregation_s, AGGREGATION_S, "assumption")),
              Assumption("server time per round", wall_s + p.aggregation_s, "s", "slowest client + aggregation")]
    a.append(Assumption("server PUE", server_pue, "", pue_src))

    compute_kwh = n * device_kwh
    upload_kwh = network_energy_kwh(n * up_b, p.network_kwh_per_gb)
    download_kwh = network_energy_kwh(n * down_b, p.network_kwh_per_gb)
    per_round = {
        "compute": (compute_kwh, emissions_kg(compute_kwh, client_g)),
        "upload": (upload_kwh, emissions_kg(upload_kwh, client_g)),
        "download": (download_kwh, emissions_kg(download_kwh, client_g)),
        "server": (server_kwh, emissions_kg(server_kwh, server_i.g_per_kwh)),
    }
    total = _breakdown({k: (e * p.rounds, g * p.rounds) for k, (e, g) in per_round.items()})
    return Estimate(total.energy_kwh, total.emissions_kg, total.by_component, p.rounds, n, _breakdown(per_round), a)


def _steady(rows: list[dict[str, Any]], key: str) -> dict[int, list[dict[str, Any]]]:
    """Rows by round, without the first round if its mean ``key`` is > 2x the median of later rounds."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    means = {r: statistics.fmean(float(x[key]) for x in group) for r, group in sorted(by_round.items())}
    first, *later = means or [0]
    if later and means[first] > 2 * statistics.median(means[r] for r in later):
        del by_round[first]  # start-up cost (hardware detection, data loading)
    return by_round


def pilot_from_rows(run: str, rows: list[dict[str, Any]], pue: dict[str, float]) -> Pilot:
    """A :class:`Pilot` from a run's ``/rounds/clients`` rows and each party's PUE (node_id -> PUE)."""
    clients = _steady([r for r in rows if r["role"] == "client"], "compute_energy_kwh")
    if not clients:
        raise ValueError(f"pilot run {run} has no client rounds yet")
    kept = [r for group in clients.values() for r in group]
    servers = _steady([r for r in rows if r["role"] == "server"], "server_energy_kwh")
    server_rows = [r for group in servers.values() for r in group]

    def mean_bytes(key: str) -> float | None:
        values = [r[key] for r in kept if r.get(key) is not None]
        return float(sum(values)) / len(kept) if values else None

    return Pilot(
        run=run,
        compute_energy_kwh_per_client_round=statistics.fmean(float(r["compute_energy_kwh"]) for r in kept),
        client_pue=statistics.fmean(pue.get(r["node_id"], 1.0) for r in kept),
        bytes_up_per_client_round=mean_bytes("bytes_up"),
        bytes_down_per_client_round=mean_bytes("bytes_down"),
        duration_s_per_round=statistics.fmean(max(float(r["duration_s"]) for r in g) for g in clients.values()),
        server_energy_kwh_per_round=sum(float(r["server_energy_kwh"]) for r in server_rows) / len(servers)
        if servers else None,
        server_pue=statistics.fmean(pue.get(r["node_id"], 1.0) for r in server_rows) if server_rows else 1.0,
        rounds_used=tuple(sorted(clients)),
    )


def fetch_pilot(server_url: str, run: str, timeout_s: float = 30.0) -> Pilot:
    """Read a pilot run (id, or name: its latest run) from a TRAICE server; ValueError with a clear message."""
    try:
        with httpx.Client(base_url=server_url.rstrip("/"), timeout=timeout_s, headers=admin_headers()) as http:

            def get(path: str) -> Any:
                response = http.get(path)
                if response.status_code >= 400:
                    raise ValueError(f"{server_url}{path} answered HTTP {response.status_code}")
                try:
                    return response.json()
                except ValueError:
                    raise ValueError(f"{server_url} does not answer like a TRAICE server") from None

            found = next((r for r in get("/api/runs") if str(r["id"]) == run or r["name"] == run), None)
            if found is None:
                raise ValueError(f"no run {run!r} on {server_url}; `traice runs` lists them")
            rows = get(f"/api/runs/{found['id']}/rounds/clients")
            pue = {c["node_id"]: float(c["pue"]) for c in get(f"/api/runs/{found['id']}/clients")}
            return pilot_from_rows(f"{found['name']} (#{found['id']})", rows, pue)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the TRAICE server at {server_url}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{server_url} does not answer like a TRAICE server ({exc!r})") from None


class Format(str, Enum):
    table = "table"
    json = "json"


def _readable(value: float, units: str) -> str:
    """``value`` (in the second of ``units``, each 1000x the next) in the largest unit that keeps it >= 1."""
    names = units.split()
    for i, unit in enumerate(names):
        x = value / 1000.0 ** (1 - i)
        if abs(x) >= 1 or i == len(names) - 1:
            return f"{x:.3g} {unit}" if abs(x) < 999.5 else f"{x:,.0f} {unit}"
    raise AssertionError  # pragma: no cover


def _show(e: Estimate, console: Console) -> None:
    def kwh(value: float) -> str:
        return _readable(value, "MWh kWh Wh mWh")

    def co2(value: float) -> str:
        return _readable(value, "t kg g mg") + " CO2e"

    table = Table(title=f"Expected: {e.rounds} rounds x {e.clients_per_round} clients per round")
    for column in ("component", "energy", "emissions", "share", "per round"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, c in e.by_component.items():
        table.add_row(name, kwh(c.energy_kwh), co2(c.emissions_kg), f"{c.share:.1%}",
                      co2(e.per_round.by_component[name].emissions_kg))
    table.add_row("total", kwh(e.energy_kwh), co2(e.emissions_kg), "100%", co2(e.per_round.emissions_kg), style="bold")
    console.print(table)
    assumptions = Table("what", "value", "source", title="Assumptions")
    for x in e.assumptions:
        v = x.value
        value = v if isinstance(v, str) else f"{v:,.0f}" if float(v).is_integer() else f"{v:,.6g}"
        assumptions.add_row(x.name, f"{value} {x.unit}".strip(), x.source)
    console.print(assumptions)


def estimate_command(
    rounds: Annotated[int, typer.Option(min=1, help="Number of FL rounds.")],
    clients_per_round: Annotated[int, typer.Option(min=1, help="Clients sampled in each round.")],
    model_bytes: Annotated[int | None, typer.Option(help="Size of the global model, in bytes.")] = None,
    model_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A saved model (e.g. a state dict): its size is the model size.")] = None,
    update_compression: Annotated[float, typer.Option(
        help="Size of a client's update / model size (with a pilot: / the pilot's upload).")] = 1.0,
    local_seconds: Annotated[float | None, typer.Option(
        help="Local training time per client and round, in s.")] = None,
    device_power_w: Annotated[float, typer.Option(
        help="Client device power while training, in W (15 W: an assumption, laptop-class CPU).")] = DEVICE_POWER_W,
    client_region: Annotated[list[str] | None, typer.Option(
        help="Clients' grid: FRA, USA:california ... Repeatable: clients spread evenly. Default: world.")] = None,
    server_region: Annotated[str | None, typer.Option(help="FL server's grid (default: world average).")] = None,
    network_kwh_per_gb: Annotated[float, typer.Option(
        help="Network energy, kWh per GB (Tapp et al. 2026; 0.005-0.06 for sensitivity).")] = NETWORK_KWH_PER_GB,
    client_pue: Annotated[float | None, typer.Option(help="Clients' PUE (default 1.0, or the pilot's).")] = None,
    server_pue: Annotated[float | None, typer.Option(help="FL server's PUE (default 1.0, or the pilot's).")] = None,
    server_power_w: Annotated[float, typer.Option(
        help="FL server power, in W (Green FL: 45 W at ~1 % utilisation).")] = SERVER_POWER_W,
    aggregation_seconds: Annotated[float, typer.Option(
        help="Server aggregation time per round, in s.")] = AGGREGATION_S,
    pilot_run: Annotated[str | None, typer.Option(
        help="Id or name of a pilot run on --server: use its measured energy and bytes.")] = None,
    server: Annotated[str, typer.Option(
        "--server", "-s", envvar="TRAICE_SERVER_URL", help="URL of the TRAICE server.")] = "http://127.0.0.1:3000",
    format: Annotated[Format, typer.Option("--format", "-f", help="table or json.")] = Format.table,
) -> None:
    """Estimate the energy and emissions of an FL training before running it (compute, upload, download, server)."""
    try:
        if model_bytes is not None and model_file is not None:
            raise ValueError("give --model-bytes or --model-file, not both")
        source = "given"
        if model_file is not None:
            model_bytes, source = model_file.stat().st_size, f"size of {model_file.name}"
        params = EstimateParams(
            clients_per_round=clients_per_round, rounds=rounds, model_bytes=model_bytes, model_bytes_source=source,
            update_compression=update_compression, local_compute_s_per_round=local_seconds,
            device_power_w=device_power_w, client_regions=tuple(client_region or ()), server_region=server_region,
            network_kwh_per_gb=network_kwh_per_gb, client_pue=client_pue, server_pue=server_pue,
            server_power_w=server_power_w, aggregation_s=aggregation_seconds,
            pilot=fetch_pilot(server, pilot_run) if pilot_run else None,
        )
        result = estimate(params)
    except ValueError as exc:
        Console(stderr=True, soft_wrap=True).print(f"traice estimate: {exc}", style="red", markup=False,
                                                   highlight=False)
        raise typer.Exit(2) from None
    if format is Format.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _show(result, Console(soft_wrap=True))
