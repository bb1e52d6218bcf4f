"""The ``traice`` command: ``server``, ``demo``, ``runs``, ``export``, and run control."""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .carbon import NETWORK_KWH_PER_GB, CarbonModel, IntensityTrace
from .estimate import estimate_command
from .report import report_command
from .rest import admin_headers
from .server.limits import Limits

app = typer.Typer(
    name="traice",
    help="TRAICE: track the energy use and carbon emissions of federated learning, live.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(soft_wrap=True)  # long lines stay whole in logs and pipes
err = Console(stderr=True, soft_wrap=True)

DEFAULT_SERVER = "http://127.0.0.1:3000"
ServerOpt = Annotated[
    str, typer.Option("--server", "-s", envvar="TRAICE_SERVER_URL", help="URL of the TRAICE server.")
]
DatabaseOpt = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar="TRAICE_DATABASE_URL",
        help="Where to store data: sqlite:///path/traice.db (default, a file here) or postgresql://user@host:5432/db.",
    ),
]


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"


class Partition(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"


def _version(value: bool) -> None:
    if value:
        console.print(f"traice {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """TRAICE: track the energy use and carbon emissions of federated learning, live."""


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    database_url: DatabaseOpt = "sqlite:///traice.db",
    network_kwh_per_gb: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Network energy intensity, kWh per GB moved (Tapp et al. 2026; "
                     "0.005-0.06 for a sensitivity analysis)."),
    ] = NETWORK_KWH_PER_GB,
    intensity_trace: Annotated[
        Optional[Path],
        typer.Option(exists=True, dir_okay=False, help="Hourly carbon intensity, Electricity Maps CSV format: "
                     "replayed for the parties whose zone it covers."),
    ] = None,
    trace_basis: Annotated[str, typer.Option(help="Which intensity of the trace: lca or direct.")] = "lca",
    admin_token: Annotated[
        Optional[str],
        typer.Option(envvar="TRAICE_ADMIN_TOKEN", show_default=False,
                     help="Token for the dashboard, REST and run control (prefer the environment variable: "
                     "command lines are visible to other users)."),
    ] = None,
    worker_token: Annotated[
        Optional[list[str]],
        typer.Option(envvar="TRAICE_WORKER_TOKEN", show_default=False,
                     help="Token workers present (TraiceClient(token=...) or TRAICE_TOKEN), valid for any run "
                     "and node. Repeat for several."),
    ] = None,
    tokens_file: Annotated[
        Optional[Path],
        typer.Option(exists=True, dir_okay=False, envvar="TRAICE_TOKENS_FILE",
                     help='Worker tokens limited to a run and nodes: a JSON list of {"token" or "sha256", '
                     '"run", "nodes"}.'),
    ] = None,
    max_frame_bytes: Annotated[
        int, typer.Option(min=1024, envvar="TRAICE_MAX_FRAME_BYTES", help="Largest socket frame accepted.")
    ] = Limits.max_frame_bytes,
    max_messages_per_s: Annotated[
        float, typer.Option(min=0.1, envvar="TRAICE_MAX_MESSAGES_PER_S",
                            help="Sustained messages per second per socket (bursts of --burst-messages more).")
    ] = Limits.max_messages_per_s,
    burst_messages: Annotated[
        int, typer.Option(min=1, envvar="TRAICE_BURST_MESSAGES", help="Messages one socket may send at once.")
    ] = Limits.burst_messages,
    max_connections_per_address: Annotated[
        int, typer.Option(min=1, envvar="TRAICE_MAX_CONNECTIONS_PER_ADDRESS",
                          help="Open sockets per client IP address (a Flower simulation opens one per virtual "
                          "client).")
    ] = Limits.max_connections_per_address,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the TRAICE server: worker socket, dashboard, REST API (docs at /docs).

    On 127.0.0.1 (the default) it needs no token. On any other address it refuses to start without
    an admin token and a worker token.
    """
    from .server import create_app, serve
    from .server.auth import Auth, check_exposure

    try:
        trace = IntensityTrace.from_csv(intensity_trace, trace_basis) if intensity_trace else None
        workers = [t for t in worker_token or [] if t]
        auth = (Auth.from_file(tokens_file, admin_token, workers) if tokens_file
                else Auth(admin_token, workers))
        check_exposure(host, auth)
        limits = Limits(max_frame_bytes=max_frame_bytes, max_messages_per_s=max_messages_per_s,
                        burst_messages=burst_messages, max_connections_per_address=max_connections_per_address)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    application = create_app(
        database_url=database_url, carbon=CarbonModel(network_kwh_per_gb=network_kwh_per_gb, trace=trace),
        auth=auth, limits=limits,
    )
    if trace is not None:
        console.print(f"Replaying hourly intensity from {trace.name} ({trace.basis}) for zones {', '.join(trace.zones)}")
    console.print(f"TRAICE server on [bold]http://{host}:{port}[/] — database {application.state.store.url}")
    if auth.admin_required:
        console.print(f"Dashboard sign-in: http://{host}:{port}/login (the admin token); REST: Authorization: Bearer")
    serve(application, host=host, port=port, log_level=log_level)


@app.command()
def demo(
    clients: Annotated[int, typer.Option(min=1, max=100, help="Number of Flower clients.")] = 3,
    rounds: Annotated[
        int, typer.Option(min=1, max=500, help="Number of FL rounds (60 leave a person time to pause, resume and stop).")
    ] = 60,
    server_url: Annotated[
        Optional[str],
        typer.Option("--server", help="Report to this running TRAICE server instead of starting one."),
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the server the demo starts.")] = 3000,
    database_url: DatabaseOpt = "sqlite:///traice.db",
    partition: Annotated[Partition, typer.Option(help="How to split the data across clients.")] = Partition.dirichlet,
    alpha: Annotated[float, typer.Option(min=0.01, help="Dirichlet concentration (smaller = more skewed).")] = 1.0,
    country: Annotated[str, typer.Option(help="Clients' grid, ISO alpha-3 (FRA, USA, DEU ...).")] = "FRA",
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name (default: demo-<time>).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the data split and models.")] = 0,
    tracking_mode: Annotated[
        str,
        typer.Option(help="machine-share (measure this machine once, share it by CPU time: the parties add up to "
                     "the machine), process or machine (codecarbon's modes)."),
    ] = "machine-share",
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Open the dashboard.")] = True,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Keep the dashboard up after training, until Ctrl-C.")
    ] = True,
) -> None:
    """Run a tracked Flower training (scikit-learn digits, small PyTorch model) and show it live."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from .demo import DemoConfig, run_demo

    config = DemoConfig(
        clients=clients,
        rounds=rounds,
        server_url=server_url,
        port=port,
        database_url=database_url,
        partition=partition.value,
        alpha=alpha,
        country_iso_code=country,
        run_name=run_name,
        seed=seed,
        tracking_mode=tracking_mode,
        open_browser=browser,
        serve_after=serve_after,
    )
    raise typer.Exit(run_demo(config, console))


def _get(server_url: str, path: str) -> Any:
    try:
        response = httpx.get(server_url.rstrip("/") + path, timeout=30, headers=admin_headers())
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach the TRAICE server at {server_url}: {exc}[/]")
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        try:
            detail = response.json()["error"]["message"]
        except Exception:
            detail = response.text
        err.print(f"[red]{response.status_code}: {detail}[/]")
        raise typer.Exit(1)
    return response.json() if "json" in response.headers.get("content-type", "") else response.text


def _resolve_run(server_url: str, run: str) -> dict[str, Any]:
    runs = _get(server_url, "/api/runs")
    for candidate in runs:  # newest first: a name means its latest run
        if str(candidate["id"]) == run or candidate["name"] == run:
            return candidate  # type: ignore[no-any-return]
    err.print(f"[red]no run {run!r} on {server_url}; `traice runs` lists them[/]")
    raise typer.Exit(1)


@app.command()
def runs(
    server_url: ServerOpt = DEFAULT_SERVER,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table or json.")] = OutputFormat.table,
) -> None:
    """List the runs on a TRAICE server."""
    data = _get(server_url, "/api/runs")
    if format is OutputFormat.json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"Runs on {server_url}")
    for column in ("id", "name", "status", "clients", "rounds", "energy (kWh)", "emissions (g CO2e)", "accuracy"):
        table.add_column(column, justify="left" if column in ("name", "status") else "right")
    for run in data:
        table.add_row(
            str(run["id"]),
            run["name"],
            run["status"],
            str(run["clients"]),
            str(run["rounds"]),
            f"{run['energy_kwh']:.6f}",
            f"{run['emissions_kg'] * 1000:.3f}",
            "–" if run["accuracy"] is None else f"{run['accuracy']:.3f}",
        )
    console.print(table)


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="Run id or name (a name means its latest run).")],
    server_url: ServerOpt = DEFAULT_SERVER,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="csv or json.")] = ExportFormat.csv,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the files to.")] = Path("."),
) -> None:
    """Download a run's rounds, clients and samples as CSV or JSON files."""
    found = _resolve_run(server_url, run)
    out.mkdir(parents=True, exist_ok=True)
    for table in ("rounds", "clients", "samples"):
        body = _get(server_url, f"/api/runs/{found['id']}/{table}.{format.value}?limit=100000")
        path = out / f"run-{found['id']}-{table}.{format.value}"
        path.write_text(body if isinstance(body, str) else json.dumps(body, indent=1), encoding="utf-8")
        console.print(f"wrote {path}")


def _post(server_url: str, path: str, body: dict[str, Any]) -> Any:
    try:
        response = httpx.post(server_url.rstrip("/") + path, json=body, timeout=30, headers=admin_headers())
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach the TRAICE server at {server_url}: {exc}[/]")
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        error = response.json().get("error", {})
        err.print(f"[red]{response.status_code} {error.get('code', '')}: {error.get('message', response.text)}[/]")
        raise typer.Exit(1)
    return response.json()


def _command(server_url: str, run: str, action: str, node_id: str | None, wait_s: float) -> None:
    found = _resolve_run(server_url, run)
    path = f"/api/runs/{found['id']}" + (f"/clients/{node_id}" if node_id else "") + "/control"
    command = _post(server_url, path, {"action": action})
    deadline = time.monotonic() + wait_s
    while command["status"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        command = next(c for c in _get(server_url, f"/api/runs/{found['id']}/commands") if c["id"] == command["id"])
    target = f"client {node_id} of run {found['name']}" if node_id else f"run {found['name']} (#{found['id']})"
    detail = f" — {command['detail']}" if command.get("detail") else ""
    console.print(f"{action} {target}: command {command['id']} {command['status']}{detail}")


WaitOpt = Annotated[
    float, typer.Option("--wait", help="Seconds to wait until the command has taken effect (0: do not wait).")
]


@app.command()
def pause(run: Annotated[str, typer.Argument(help="Run id or name.")], server_url: ServerOpt = DEFAULT_SERVER,
          wait: WaitOpt = 0.0) -> None:
    """Pause a run: training holds before its next round."""
    _command(server_url, run, "pause", None, wait)


@app.command()
def resume(run: Annotated[str, typer.Argument(help="Run id or name.")], server_url: ServerOpt = DEFAULT_SERVER,
           wait: WaitOpt = 0.0) -> None:
    """Resume a paused run from the same round and model."""
    _command(server_url, run, "resume", None, wait)


@app.command()
def stop(run: Annotated[str, typer.Argument(help="Run id or name.")], server_url: ServerOpt = DEFAULT_SERVER,
         wait: WaitOpt = 0.0) -> None:
    """Stop a run after its current round (final: it cannot be resumed)."""
    _command(server_url, run, "stop", None, wait)


@app.command()
def exclude(run: Annotated[str, typer.Argument(help="Run id or name.")],
            node_id: Annotated[str, typer.Argument(help="The client's node id.")],
            server_url: ServerOpt = DEFAULT_SERVER, wait: WaitOpt = 0.0) -> None:
    """Take a client out of the next rounds."""
    _command(server_url, run, "exclude", node_id, wait)


@app.command()
def include(run: Annotated[str, typer.Argument(help="Run id or name.")],
            node_id: Annotated[str, typer.Argument(help="The client's node id.")],
            server_url: ServerOpt = DEFAULT_SERVER, wait: WaitOpt = 0.0) -> None:
    """Let an excluded client take part again from the next round."""
    _command(server_url, run, "include", node_id, wait)


app.command("estimate")(estimate_command)
app.command("report")(report_command)


def main() -> None:
    app()
