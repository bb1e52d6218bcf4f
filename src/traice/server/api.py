"""REST: runs, rounds, clients and samples, each also as a ``.csv`` and ``.json`` download."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Callable, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response as FastAPIResponse
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..forecast import forecast
from ..protocol import NO_NUL
from ..store.base import Store, StoreError
from .auth import bearer
from .hub import Hub

router = APIRouter(prefix="/api")


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ComponentOut(BaseModel):
    energy_kwh: float
    emissions_kg: float


class RunOut(BaseModel):
    id: int
    name: str
    status: str
    started_at: str
    ended_at: str | None
    rounds_planned: int | None
    clients: int
    clients_online: int
    rounds: int
    energy_kwh: float = Field(description="all components: compute + upload + download + server")
    emissions_kg: float
    by_component: dict[str, ComponentOut] = Field(description="compute, upload, download, server")
    bytes_up: int
    bytes_down: int
    accuracy: float | None
    network_kwh_per_gb: float
    carbon_model: dict[str, Any] | None = Field(description="the assumptions this run was accounted with")


class RunDetailOut(RunOut):
    by_client: list[dict[str, Any]] = Field(
        description="each client's (and the FL server's) node_id, role, energy_kwh and emissions_kg; they add up "
        "to the run's total"
    )
    intensities: list[dict[str, Any]] = Field(description="each party's grid intensity, PUE and their sources")


class RoundOut(BaseModel):
    round: int
    clients: int
    duration_s: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    energy_kwh: float
    emissions_kg: float
    compute_energy_kwh: float
    compute_emissions_kg: float
    upload_energy_kwh: float
    upload_emissions_kg: float
    download_energy_kwh: float
    download_emissions_kg: float
    server_energy_kwh: float
    server_emissions_kg: float
    accuracy: float | None
    loss: float | None
    server_accuracy: float | None
    server_loss: float | None
    num_examples: int | None
    bytes_up: int | None
    bytes_down: int | None
    started_at: str | None
    ended_at: str | None


class ClientOut(BaseModel):
    node_id: str
    role: str
    status: str
    country_iso_code: str | None
    region: str | None
    intensity_g_per_kwh: float
    intensity_source: str | None
    pue: float
    hardware: dict[str, Any]
    sdk_version: str | None
    excluded: bool
    energy_kwh: float
    emissions_kg: float
    compute_energy_kwh: float
    compute_emissions_kg: float
    upload_energy_kwh: float
    upload_emissions_kg: float
    download_energy_kwh: float
    download_emissions_kg: float
    server_energy_kwh: float
    server_emissions_kg: float
    bytes_up: int
    bytes_down: int
    rounds: int
    last_accuracy: float | None
    first_seen: str
    last_seen: str
    run_id: int


class ClientRoundOut(BaseModel):
    round: int
    node_id: str
    role: str
    energy_kwh: float
    emissions_kg: float
    compute_energy_kwh: float
    compute_emissions_kg: float
    upload_energy_kwh: float
    upload_emissions_kg: float
    download_energy_kwh: float
    download_emissions_kg: float
    server_energy_kwh: float
    server_emissions_kg: float

    duration_s: float
    accuracy: float | None
    loss: float | None
    num_examples: int | None
    bytes_up: int | None
    bytes_down: int | None


class SampleOut(BaseModel):
    node_id: str
    t: str
    cpu_w: float
    gpu_w: float
    ram_w: float
    power_w: float


class RunControl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["pause", "resume", "stop"]


class ClientControl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["exclude", "include"]


class CommandOut(BaseModel):
    id: int
    run_id: int
    node_id: str | None
    action: str
    status: str = Field(description="requested → acknowledged → done (or failed)")
    source: str
    detail: str | None
    requested_at: str
    updated_at: str


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["emissions_kg_over", "power_w_over", "accuracy_gain_per_100g_below"]
    threshold: float = Field(allow_inf_nan=False)
    window_rounds: int | None = Field(default=None, ge=1, le=10_000)
    level: Literal["info", "warning", "critical"] = "warning"
    action: Literal["none", "pause", "stop"] = "none"


class RuleOut(BaseModel):
    id: int
    run_id: int
    kind: str
    threshold: float
    window_rounds: int | None
    level: str
    action: str
    fired_at: str | None
    fired_value: float | None
    created_at: str


ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
# 400: a body that cannot even be decoded (not UTF-8, say)
CONTROL_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS, 400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}
}
NOT_FOUND = {"run_not_found", "client_not_found", "rule_not_found", "unknown_command"}


def _api_error(exc: StoreError) -> ApiError:
    if exc.code in NOT_FOUND:
        return ApiError(404, exc.code, exc.message)
    if exc.code.startswith("invalid_"):
        return ApiError(422, exc.code, exc.message)
    return ApiError(409, exc.code, exc.message)


def _hub(request: Request) -> Hub:
    return request.app.state.hub  # type: ignore[no-any-return]


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def _run_or_404(store: Store, run_id: int) -> dict[str, Any]:
    run = store.get_run(run_id)
    if run is None:
        raise ApiError(404, "run_not_found", f"run {run_id} does not exist")
    return run


RunId = Annotated[int, Query(ge=1)]
# Ids are SQL integers: a larger one names nothing (and SQLite cannot even look it up: a 500).
MAX_ID = 2**31 - 1
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
# No node id has a NUL (the protocol refuses them), and PostgreSQL cannot even compare one: a 500.
NodePath = Annotated[str, Path(pattern=NO_NUL)]
NodeQuery = Annotated[str | None, Query(pattern=NO_NUL)]
Limit = Annotated[int, Query(ge=1, le=100_000, description="most samples to return")]
Since = Annotated[
    float | None, Query(ge=0, le=253_402_300_799, description="only samples after this unix time (s)")
]  # the last second of year 9999: later times are not dates


@router.get("/runs", response_model=list[RunOut], summary="All runs, newest first")
def list_runs(request: Request) -> list[dict[str, Any]]:
    return _store(request).list_runs()


@router.get(
    "/runs/{run_id}",
    response_model=RunDetailOut,
    responses=ERRORS,
    summary="One run, with emissions by component and by client",
)
def get_run(request: Request, run_id: PathId) -> dict[str, Any]:
    store = _store(request)
    run = _run_or_404(store, run_id)
    parties = store.clients(run_id)
    run["by_client"] = [
        {k: p[k] for k in ("node_id", "role", "energy_kwh", "emissions_kg", "compute_emissions_kg",
                           "upload_emissions_kg", "download_emissions_kg", "server_emissions_kg")}
        for p in parties
    ]
    run["intensities"] = [
        {k: p[k] for k in ("node_id", "role", "country_iso_code", "region", "intensity_g_per_kwh",
                           "intensity_source", "pue")}
        for p in parties
    ]
    return run


def _rounds(store: Store, run_id: int, **_: Any) -> list[dict[str, Any]]:
    return store.rounds(run_id)


def _clients(store: Store, run_id: int, **_: Any) -> list[dict[str, Any]]:
    return store.clients(run_id)


def _samples(
    store: Store, run_id: int, *, since: float | None = None, node_id: str | None = None, limit: int = 10_000
) -> list[dict[str, Any]]:
    return store.samples(run_id, since=since, node_id=node_id, limit=limit)


TABLES: dict[str, tuple[Callable[..., list[dict[str, Any]]], type[BaseModel], str]] = {
    "rounds": (_rounds, RoundOut, "Per round: energy, emissions, duration, weighted accuracy and loss"),
    "clients": (_clients, ClientOut, "Per client: status, location, hardware, energy, emissions"),
    "samples": (_samples, SampleOut, "Live power samples (W) of every client"),
}


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return out.getvalue()


def _table_routes(name: str) -> None:
    fetch, model, summary = TABLES[name]
    columns = list(model.model_fields)

    def rows(request: Request, run_id: int, since: float | None, node_id: str | None, limit: int) -> list[dict[str, Any]]:
        store = _store(request)
        _run_or_404(store, run_id)
        return fetch(store, run_id, since=since, node_id=node_id, limit=limit)

    @router.get(f"/runs/{{run_id}}/{name}", response_model=list[model], responses=ERRORS, summary=summary)  # type: ignore[valid-type]
    def as_list(
        request: Request, run_id: PathId, since: Since = None, node_id: NodeQuery = None, limit: Limit = 10_000
    ) -> list[dict[str, Any]]:
        return rows(request, run_id, since, node_id, limit)

    @router.get(f"/runs/{{run_id}}/{name}.json", responses=ERRORS, summary=f"{name} as a JSON download")
    def as_json(
        request: Request, run_id: PathId, since: Since = None, node_id: NodeQuery = None, limit: Limit = 10_000
    ) -> Response:
        body = json.dumps(rows(request, run_id, since, node_id, limit), indent=1)
        return Response(
            body,
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="run-{run_id}-{name}.json"'},
        )

    @router.get(
        f"/runs/{{run_id}}/{name}.csv",
        responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
        response_class=Response,
        summary=f"{name} as a CSV download",
    )
    def as_csv(
        request: Request, run_id: PathId, since: Since = None, node_id: NodeQuery = None, limit: Limit = 10_000
    ) -> Response:
        return Response(
            _csv(rows(request, run_id, since, node_id, limit), columns),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="run-{run_id}-{name}.csv"'},
        )

    for endpoint in (as_list, as_json, as_csv):
        endpoint.__name__ = f"{endpoint.__name__}_{name}"


for _name in TABLES:
    _table_routes(_name)


@router.get(
    "/runs/{run_id}/rounds/clients",
    response_model=list[ClientRoundOut],
    responses=ERRORS,
    summary="Per round and client: energy, emissions, duration, accuracy (one client with node_id)",
)
def client_rounds(request: Request, run_id: PathId, node_id: NodeQuery = None) -> list[dict[str, Any]]:
    store = _store(request)
    _run_or_404(store, run_id)
    return store.client_rounds(run_id, node_id)


@router.get("/runs/{run_id}/forecast", responses=ERRORS, summary="Forecast of the run's total and to a target accuracy")
def run_forecast(
    request: Request,
    run_id: PathId,
    target_accuracy: Annotated[float | None, Query(gt=0, le=1, description="forecast the cost to reach this")] = None,
) -> dict[str, Any]:
    """Energy and emissions at the end of the run (``rounds_planned``) with a 90 % interval, the
    Carbontracker-style forecast for comparison, and the rounds and cost to reach ``target_accuracy``.
    Fields are null while there is not enough data."""
    store = _store(request)
    run = _run_or_404(store, run_id)
    rounds = store.rounds(run_id)
    planned = run["rounds_planned"]
    if run["status"] in ("finished", "stopped", "failed") and rounds:  # an ended run has no rounds to come
        planned = max(r["round"] for r in rounds)
    return forecast(rounds, planned, target_accuracy)


# --------------------------------------------------------------------------- run control


@router.post(
    "/runs/{run_id}/control",
    response_model=CommandOut,
    status_code=202,
    responses=CONTROL_ERRORS,
    summary="Pause, resume or stop a run",
)
async def control_run(request: Request, run_id: PathId, body: RunControl) -> dict[str, Any]:
    try:
        return await _hub(request).command(run_id, body.action)
    except StoreError as exc:
        raise _api_error(exc) from None


@router.post(
    "/runs/{run_id}/clients/{node_id}/control",
    response_model=CommandOut,
    status_code=202,
    responses=CONTROL_ERRORS,
    summary="Exclude a client from the next rounds, or include it again",
)
async def control_client(request: Request, run_id: PathId, node_id: NodePath, body: ClientControl) -> dict[str, Any]:
    try:
        return await _hub(request).command(run_id, body.action, node_id)
    except StoreError as exc:
        raise _api_error(exc) from None


@router.get("/runs/{run_id}/commands", response_model=list[CommandOut], responses=ERRORS, summary="Commands, newest first")
def list_commands(request: Request, run_id: PathId) -> list[dict[str, Any]]:
    store = _store(request)
    _run_or_404(store, run_id)
    return store.list_commands(run_id)


@router.get("/runs/{run_id}/rules", response_model=list[RuleOut], responses=ERRORS, summary="Alert rules")
def list_rules(request: Request, run_id: PathId) -> list[dict[str, Any]]:
    store = _store(request)
    _run_or_404(store, run_id)
    return store.list_rules(run_id)


@router.post(
    "/runs/{run_id}/rules",
    response_model=RuleOut,
    status_code=201,
    responses=CONTROL_ERRORS,
    summary="Add an alert rule: it fires once, shows in the run, and may pause or stop it",
)
async def add_rule(request: Request, run_id: PathId, body: RuleIn) -> dict[str, Any]:
    try:
        return await _hub(request).add_rule(run_id, **body.model_dump())
    except StoreError as exc:
        raise _api_error(exc) from None


@router.delete("/runs/{run_id}/rules/{rule_id}", status_code=204, responses=ERRORS, summary="Delete an alert rule")
async def delete_rule(request: Request, run_id: PathId, rule_id: PathId) -> FastAPIResponse:
    try:
        await _hub(request).delete_rule(run_id, rule_id)
    except StoreError as exc:
        raise _api_error(exc) from None
    return FastAPIResponse(status_code=204)


def require_admin(request: Request) -> None:
    """Every REST call needs the admin token when the server has one (header or dashboard cookie)."""
    if not request.app.state.auth.is_admin(bearer(request.headers, request.cookies)):
        raise ApiError(401, "unauthorized", "this needs the admin token: TRAICE_ADMIN_TOKEN for the CLI, "
                       "'Authorization: Bearer <token>' for REST, or sign in at /login")


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON: ``{"error": {"code": ..., "message": ...}}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"code": "invalid_request", "message": problems}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(_: Request, exc: OperationalError) -> JSONResponse:
        # The database is away (stopped, restarting, unreachable): a clean 503, not a 500 with a traceback.
        return JSONResponse(
            {"error": {"code": "database_unavailable", "message": "the database is unreachable; try again shortly"}},
            status_code=503, headers={"Retry-After": "5"},
        )
