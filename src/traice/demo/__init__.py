"""``traice demo``: a TRAICE server and a tracked 3-client Flower simulation on bundled data."""

from __future__ import annotations

import os
import time
import webbrowser
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table


@dataclass
class DemoConfig:
    clients: int = 3
    rounds: int = 60
    server_url: str | None = None  # None: start a server here
    port: int = 3000
    database_url: str = "sqlite:///traice.db"
    partition: str = "dirichlet"
    alpha: float = 1.0
    country_iso_code: str | None = "FRA"
    run_name: str | None = None
    seed: int = 0
    open_browser: bool = True
    serve_after: bool = True
    # All parties share one machine: measure it once and share it out, so they add up to it.
    tracking_mode: str = "machine-share"


def _backend_config(clients: int) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    # On a small machine one Ray actor running clients in turn is fastest: each extra actor
    # costs a process with its own torch import and competes for the same cores.
    per_client = 2 if cores <= 4 else 1
    return {
        "client_resources": {"num_cpus": min(per_client, cores), "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": True},
    }


def run_demo(config: DemoConfig, console: Console) -> int:
    """Run the demo; returns the process exit code."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from ..server import ServerThread, create_app

    run_name = config.run_name or f"demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    server = None
    if config.server_url is None:
        try:
            server = ServerThread(create_app(database_url=config.database_url), port=config.port).start()
        except OSError as exc:
            console.print(f"[red]cannot listen on port {config.port} ({exc}); pass --port N or --server URL[/]")
            return 2
        server_url = server.url
    else:
        server_url = config.server_url.rstrip("/")
    dashboard = f"{server_url}/"
    console.print(f"[bold green]TRAICE dashboard:[/] {dashboard}")
    console.print(
        f"Training: {config.clients} Flower clients, {config.rounds} rounds, digits ({config.partition} split), "
        f"run [bold]{run_name}[/]"
    )
    if config.open_browser:
        webbrowser.open(dashboard)

    started = time.monotonic()

    def on_round(server_round: int, accuracy: float) -> None:
        console.print(
            f"[cyan]round {server_round}/{config.rounds}[/]  global accuracy {accuracy:.3f}  "
            f"({time.monotonic() - started:.0f} s)"
        )

    try:
        _simulate(config, server_url, run_name, on_round)
        run = _find_run(server_url, run_name)
        if run is None:
            console.print("[red]the run was not recorded; is the TRAICE server reachable?[/]")
            return 1
        _print_summary(console, server_url, run)
        console.print(f"[bold green]Dashboard:[/] {dashboard}   exports: {server_url}/api/runs/{run['id']}/rounds.csv")
        if server is not None and config.serve_after:
            console.print("Serving the dashboard; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if server is not None:
            server.stop()


def _simulate(config: DemoConfig, server_url: str, run_name: str, on_round: Any) -> None:
    from flwr.simulation import run_simulation

    from .apps import client_app, make_server_app

    server_app = make_server_app(
        rounds=config.rounds,
        clients=config.clients,
        server_url=server_url,
        run=run_name,
        country_iso_code=config.country_iso_code,
        partition=config.partition,
        alpha=config.alpha,
        seed=config.seed,
        on_round=on_round,
        tracking_mode=config.tracking_mode,
    )
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=config.clients,
        backend_config=_backend_config(config.clients),
    )


def _find_run(server_url: str, name: str) -> dict[str, Any] | None:
    for run in httpx.get(f"{server_url}/api/runs", timeout=30).json():
        if run["name"] == name:
            return run  # type: ignore[no-any-return]
    return None


def _print_summary(console: Console, server_url: str, run: dict[str, Any]) -> None:
    rounds = httpx.get(f"{server_url}/api/runs/{run['id']}/rounds", timeout=30).json()
    clients = httpx.get(f"{server_url}/api/runs/{run['id']}/clients", timeout=30).json()
    table = Table(title=f"Run {run['name']} (#{run['id']}), {run['status']}")
    for column in ("round", "clients", "duration (s)", "energy (Wh)", "emissions (mg CO2e)", "accuracy", "global accuracy"):
        table.add_column(column, justify="right")
    for r in rounds:
        table.add_row(
            str(r["round"]),
            str(r["clients"]),
            f"{r['duration_s']:.2f}",
            f"{r['energy_kwh'] * 1000:.4f}",
            f"{r['emissions_kg'] * 1e6:.3f}",
            "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
            "–" if r["server_accuracy"] is None else f"{r['server_accuracy']:.3f}",
        )
    console.print(table)
    console.print(
        f"Total: [bold]{run['energy_kwh'] * 1000:.4f} Wh[/], [bold]{run['emissions_kg'] * 1000:.4f} g CO2e[/] "
        f"over {run['rounds']} rounds and {run['clients']} clients; final accuracy "
        + ("–" if run["accuracy"] is None else f"{run['accuracy']:.3f}")
    )
    methods = {c["hardware"].get("cpu_power_method") for c in clients}
    if "cpu_load" in methods:
        console.print(
            "[yellow]Note:[/] no RAPL energy counters on this machine: codecarbon estimated CPU power from "
            "load (TDP x load). Energy figures are estimates."
        )
    intensities = sorted({(c["country_iso_code"] or "world", c["intensity_g_per_kwh"]) for c in clients})
    console.print(
        "Grid intensity: " + ", ".join(f"{country} {value:.0f} g CO2e/kWh" for country, value in intensities)
        + " (codecarbon's annual data)"
    )
