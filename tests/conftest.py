"""Shared fixtures: real stores (SQLite file, PostgreSQL database), a real server on a free port."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from traice.server import ServerThread, create_app
from traice.store import SqlStore, normalize_database_url

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

POSTGRES_URL = os.environ.get("TRAICE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _postgres_admin() -> Any:
    return create_engine(normalize_database_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A scratch PostgreSQL database for this test session, dropped at the end."""
    admin = _postgres_admin()
    name = f"traice_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # CI starts PostgreSQL (.ci/run); elsewhere say clearly what is missing
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    base = normalize_database_url(POSTGRES_URL)
    url = base.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that uses it runs once on an SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'traice.db'}"
    url: str = request.getfixturevalue("postgres_url")
    _reset_postgres(url)
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    s = SqlStore(database_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'traice.db'}"


@pytest.fixture
def server(sqlite_url: str) -> Iterator[ServerThread]:
    """A real TRAICE server on 127.0.0.1 and a free port, on an SQLite file."""
    with ServerThread(create_app(database_url=sqlite_url)) as running:
        yield running


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


CHROMIUM = os.environ.get("TRAICE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield launched
        launched.close()
