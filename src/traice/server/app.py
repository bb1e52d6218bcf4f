"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..carbon import CarbonModel
from ..store import SqlStore, Store
from . import api, ws
from .hub import Hub

DEFAULT_DATABASE_URL = "sqlite:///traice.db"


def create_app(
    store: Store | None = None, *, database_url: str = DEFAULT_DATABASE_URL, carbon: CarbonModel | None = None
) -> FastAPI:
    """Build the server around ``store`` (or an :class:`SqlStore` on ``database_url`` that accounts
    with ``carbon``)."""
    store = store if store is not None else SqlStore(database_url, carbon=carbon)
    hub = Hub(store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(
        title="TRAICE",
        version=__version__,
        summary="Real-time energy and carbon tracking for federated learning",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.hub = hub
    api.install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(ws.router)

    static = resources.files("traice") / "dashboard" / "static"

    # plotly.js ships inside the plotly Python package: charts work offline, with no CDN.
    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        bundle = resources.files("plotly") / "package_data" / "plotly.min.js"
        return FileResponse(str(bundle), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/healthz", summary="Liveness and database reachability")
    def healthz() -> JSONResponse:
        database_ok = store.ping()
        return JSONResponse(
            {"status": "ok" if database_ok else "degraded", "database": "ok" if database_ok else "unreachable",
             "version": __version__},
            status_code=200 if database_ok else 503,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return (static / "index.html").read_text(encoding="utf-8")

    return app
