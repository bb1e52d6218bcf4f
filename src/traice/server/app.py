"""The application factory."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..carbon import CarbonModel
from ..store import SqlStore, Store
from . import api, ws
from .auth import ADMIN_COOKIE, Auth
from .hub import Hub
from .limits import ConnectionCounter, Limits

DEFAULT_DATABASE_URL = "sqlite:///traice.db"


def create_app(
    store: Store | None = None,
    *,
    database_url: str = DEFAULT_DATABASE_URL,
    carbon: CarbonModel | None = None,
    auth: Auth | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """Build the server around ``store`` (or an :class:`SqlStore` on ``database_url`` that accounts
    with ``carbon``). Without ``auth`` it is open: serve it on loopback only (see :func:`.auth.check_exposure`)."""
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
    app.state.auth = auth = auth or Auth()
    app.state.limits = limits = limits or Limits()
    app.state.connections = ConnectionCounter(limits.max_connections_per_address)
    api.install_error_handlers(app)
    app.include_router(
        api.router, dependencies=[Depends(api.require_admin)],
        # every route can meet a missing token, and a database that is away (api.py's handler)
        responses={401: {"model": api.ErrorResponse}, 503: {"model": api.ErrorResponse}}
    )
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

    # Sign-in for the dashboard: the admin token goes into an HttpOnly, SameSite=Strict cookie,
    # which the browser then sends with every REST call and the dashboard socket (and, being
    # SameSite=Strict, never with a request another site makes it send).
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page() -> str:
        return _login_html()

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        if not auth.is_admin(token or None):
            return HTMLResponse(_login_html("That is not the admin token."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        if token:
            response.set_cookie(ADMIN_COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(ADMIN_COOKIE)
        return response

    return app


def _login_html(problem: str = "") -> str:
    note = f'<p class="error" role="alert">{html.escape(problem)}</p>' if problem else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TRAICE — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/traice.css"></head>
<body><main class="login"><h1>TRAICE</h1>
<form method="post" action="/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>{note}
<p class="hint">The token the server was started with (<code>--admin-token</code> or <code>TRAICE_ADMIN_TOKEN</code>).</p>
</form></main></body></html>"""
