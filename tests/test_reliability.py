"""Reliability: nothing lost, nothing doubled — with real processes, real sockets and a real database.

1. The server is killed with SIGKILL mid-run and started again on the same port and file.
2. The network between a worker and the server is cut for 30 s (a TCP proxy drops every
   connection and refuses new ones), then restored.
3. The database (a private PostgreSQL instance) is stopped for 10 s, then started again: the
   server keeps its worker sockets, answers REST with a clean 503, tells dashboards, and stores
   everything once it is back.

Workers are separate processes (tests/reliability_worker.py) running TraiceClient with the real
meter; each writes what it produced, and the store must hold exactly that. Every wait is bounded;
every process is killed (by process group) in a ``finally``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from processes import free_port, kill_group, spawn_server, wait_answers
from traice.server import ServerThread, create_app
from traice.store import normalize_database_url
from traice.store.models import clients, reports, runs
from wire import dial, events_of, hello, recv_json, round_msg

log = logging.getLogger("test_reliability")  # phases, with times: shown when a test fails
WORKER_SCRIPT = Path(__file__).resolve().parent / "reliability_worker.py"
# Children get no TRAICE_* settings from whoever runs the tests (tokens, outbox paths, ...).
CHILD_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TRAICE_")} | {
    "FLWR_TELEMETRY_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------- processes


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail (not hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def server_args(database_url: str) -> list[str]:
    # RELIABILITY_LOG_LEVEL=debug logs every frame to the server's log in tmp_path
    return ["--database-url", database_url, "--log-level", os.environ.get("RELIABILITY_LOG_LEVEL", "warning")]


@dataclass
class Worker:
    node: str
    process: subprocess.Popen[bytes]
    out: Path
    log: Path

    def result(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """What the worker produced, once it has stopped (it must stop by itself, having delivered all)."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.node} did not finish within {timeout_s:.0f} s:\n{tail(self.log)}")
        assert self.out.exists(), f"worker {self.node} exited with {code} and no result:\n{tail(self.log)}"
        result: dict[str, Any] = json.loads(self.out.read_text())
        assert code == 0 and result["delivered"], (
            f"worker {self.node}: stop() did not get everything acknowledged:\n{tail(self.log)}"
        )
        return result


def start_worker(
    tmp: Path, url: str, run: str, node: str, rounds: int, interval_s: float = 0.25, start_when: Path | None = None
) -> Worker:
    """A worker process (tests/reliability_worker.py); with ``start_when`` it connects once that file exists."""
    out, log = tmp / f"worker-{node}.json", tmp / f"worker-{node}.log"
    wait = ["--start-when", str(start_when)] if start_when is not None else []
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), "--url", url, "--run", run, "--node", node,
             "--rounds", str(rounds), "--interval", str(interval_s), "--flush-timeout", "90", "--out", str(out), *wait],
            stdout=stream, stderr=subprocess.STDOUT, env=CHILD_ENV, start_new_session=True,
        )
    return Worker(node, process, out, log)


# ---------------------------------------------------------------------------- reading back


def run_named(url: str, name: str) -> dict[str, Any] | None:
    found = [r for r in httpx.get(f"{url}/api/runs", timeout=10).json() if r["name"] == name]
    return max(found, key=lambda r: r["id"]) if found else None


def rounds_stored(url: str, run: str) -> dict[str, int]:
    """Rounds stored per node of the newest run named ``run`` (REST)."""
    found = run_named(url, run)
    if found is None:
        return {}
    return {c["node_id"]: c["rounds"] for c in httpx.get(f"{url}/api/runs/{found['id']}/clients", timeout=10).json()}


def each_has_rounds(url: str, run: str, nodes: list[str], at_least: int) -> Callable[[], bool]:
    def check() -> bool:
        stored = rounds_stored(url, run)
        return all(stored.get(node, 0) >= at_least for node in nodes)

    return check


def assert_stored_exactly_once(database_url: str, api_url: str, results: list[dict[str, Any]]) -> None:
    """The store holds, for each worker, exactly what it produced: rounds 1..N once each, and its
    tail report once if it sent one; nothing else, nothing twice. REST agrees."""
    engine = create_engine(normalize_database_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(clients.c.node_id, reports.c.run_id, reports.c.session, reports.c.seq, reports.c.round,
                       reports.c.phase, reports.c.energy_kwh)
                .join(clients, clients.c.id == reports.c.client_id)
                .where(reports.c.run_id.in_({r["run_id"] for r in results}))
            ).mappings().all()
            statuses = {
                (row.run_id, row.node_id): row.status
                for row in conn.execute(select(clients.c.run_id, clients.c.node_id, clients.c.status))
            }
    finally:
        engine.dispose()
    for result in results:
        node, n = result["node_id"], result["rounds"]
        mine = [row for row in rows if row["run_id"] == result["run_id"] and row["node_id"] == node]
        assert {row["session"] for row in mine} == {result["session"]}, f"{node}: reports from another session"
        keys = [(row["session"], row["seq"]) for row in mine]
        assert len(keys) == len(set(keys)), f"{node}: a (session, seq) stored twice"
        numbers = sorted(row["round"] for row in mine if row["phase"] == "round")
        missing = sorted(set(range(1, n + 1)) - set(numbers))
        doubled = sorted({x for x in numbers if numbers.count(x) > 1})
        assert not missing and not doubled and numbers == list(range(1, n + 1)), (
            f"{node}: {len(numbers)} round reports stored for {n} produced; missing {missing}, doubled {doubled}"
        )
        tails = [row for row in mine if row["phase"] == "tail"]
        assert len(tails) == (1 if result["tail"] else 0), f"{node}: {len(tails)} tail reports, sent {result['tail']}"
        assert all(row["round"] == n for row in tails)
        assert len(mine) == n + len(tails), f"{node}: unexpected reports {[dict(r) for r in mine]}"
        assert statuses[(result["run_id"], node)] == "finished", f"{node}: its bye was not stored"
        # The running totals (what REST and the dashboard show) counted each report once too.
        by_node = {c["node_id"]: c for c in
                   httpx.get(f"{api_url}/api/runs/{result['run_id']}/clients", timeout=10).json()}
        assert by_node[node]["rounds"] == n
        assert by_node[node]["energy_kwh"] == pytest.approx(sum(row["energy_kwh"] for row in mine), rel=1e-9, abs=1e-15)


def acked_up_to(ws: ClientConnection, seq: int, timeout_s: float) -> bool:
    """Read the socket's acks (in order, each seq at most once) until one covers ``seq``."""
    deadline = time.monotonic() + timeout_s
    last = 0
    while last < seq:
        message = recv_json(ws, timeout=max(0.1, deadline - time.monotonic()))
        assert message["type"] == "ack" and message["seq"] > last, message
        last = message["seq"]
    return True


def produced_between(result: dict[str, Any], start: float, end: float) -> int:
    return sum(1 for t in result["produced_at"] if start <= t <= end)


# ---------------------------------------------------------------------------- a cuttable TCP proxy


class CuttableProxy:
    """Forwards 127.0.0.1:``port`` to the upstream port. ``cut()`` resets every open connection
    and resets new ones at once until ``restore()``. Counts the connections it forwarded."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.forwarded = 0  # connections passed to the server
        self.refused = 0  # connections reset during a cut
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="test-proxy")
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # SO_LINGER 0: close() sends RST, as a dropped route or a rebooted middlebox would.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv(); it closes the socket

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self._cut or self._closed
                if refuse:
                    self.refused += 1
            if refuse:
                self._reset(client)
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                client.close()
                continue
            with self._lock:
                self.forwarded += 1
                self._open.update((client, upstream))
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open.difference_update((source, sink))
        for sock in (source, sink):  # the other direction's pump then ends too
            if self._cut:
                self._reset(sock)
            else:
                _shutdown(sock)
            sock.close()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            victims = list(self._open)
        for sock in victims:
            self._reset(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(5)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------- a dashboard listener


class Dashboard:
    """A ``/ws/dashboard`` socket whose frames are collected by a thread."""

    def __init__(self, http_url: str) -> None:
        self.ws: ClientConnection = dial(http_url.replace("http://", "ws://") + "/ws/dashboard")
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True, name="test-dashboard")
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            for frame in self.ws:
                with self._cond:
                    self.messages.extend(events_of(json.loads(frame)))
                    self._cond.notify_all()

    def health(self) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if m["type"] == "health"]

    def wait_health(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len([m for m in self.messages if m["type"] == "health"]) >= count,
                                       timeout_s):
                raise AssertionError(f"the dashboard got {self.health_unlocked()} within {timeout_s:.0f} s, "
                                     f"not {count} health event(s); all it got: "
                                     f"{[m['type'] for m in self.messages]}")
        return self.health()

    def health_unlocked(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "health"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self._thread.join(5)


# ---------------------------------------------------------------------------- 1. server SIGKILL


def test_server_killed_mid_run_and_restarted_loses_and_doubles_nothing(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database_url = f"sqlite:///{tmp_path / 'traice.db'}"
    nodes = ["w1", "w2", "w3"]
    started: list[subprocess.Popen[bytes]] = []
    try:
        server, _ = spawn_server(server_args(database_url), tmp_path / "server-1.log", CHILD_ENV, port)
        started.append(server)
        # The workers start with it (they retry until it answers): both take seconds to import.
        workers = [start_worker(tmp_path, url, "sigkill", node, rounds=60, interval_s=0.2) for node in nodes]
        started += [w.process for w in workers]
        wait_answers(server, url, tmp_path / "server-1.log")
        wait_until(each_has_rounds(url, "sigkill", nodes, 2), 90, "every worker to have 2 rounds stored")
        log.info("workers reporting; killing the server")

        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        killed_at = time.time()
        assert all(w.process.poll() is None for w in workers), "the workers must still be running"
        time.sleep(3)  # the server is gone; the workers keep training and reporting
        restarted_at = time.time()
        started.append(spawn_server(server_args(database_url), tmp_path / "server-2.log", CHILD_ENV, port)[0])
        wait_answers(started[-1], url, tmp_path / "server-2.log")
        log.info("server restarted")

        results = [w.result(timeout_s=120) for w in workers]
        log.info("workers done")
        assert len({r["run_id"] for r in results}) == 1, "all workers are in one run, across the restart"
        for result in results:
            assert produced_between(result, killed_at, restarted_at) > 0, "each worker reported while the server was down"
        assert_stored_exactly_once(database_url, url, results)
        assert run_named(url, "sigkill")["status"] == "finished"  # type: ignore[index]
    finally:
        for process in started:
            kill_group(process)


# ---------------------------------------------------------------------------- 2. network cut


def test_network_cut_for_30_s_worker_reconnects_and_resends(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'traice.db'}"
    with ServerThread(create_app(database_url=database_url)) as server:
        proxy = CuttableProxy(server.port)
        worker: Worker | None = None
        try:
            worker = start_worker(tmp_path, proxy.url, "netcut", "w-cut", rounds=130, interval_s=0.25)
            wait_until(each_has_rounds(server.url, "netcut", ["w-cut"], 3), 90, "3 rounds stored through the proxy")
            assert proxy.forwarded == 1

            log.info("worker reporting; cutting the network")
            proxy.cut()
            cut_at = time.time()
            time.sleep(30)  # the cut: every connection dropped, every new one reset
            restored_at = time.time()
            proxy.restore()
            log.info("network restored")

            result = worker.result(timeout_s=150)
            log.info("worker done")
        finally:
            if worker is not None:
                kill_group(worker.process)
            proxy.close()
        assert proxy.refused >= 1, "the worker tried to reconnect during the cut"
        assert proxy.forwarded >= 2, "the worker reconnected after the cut"
        assert produced_between(result, cut_at, restored_at) > 0, "the worker reported during the cut"
        assert_stored_exactly_once(database_url, server.url, [result])


# ---------------------------------------------------------------------------- 3. database outage


def _postgres_bindir() -> Path | None:
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    candidates = [Path(p).parent for p in reversed(found)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    return None


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test module's own: trust auth on 127.0.0.1:``port``."""

    bindir: Path
    base: Path
    port: int
    as_postgres: bool
    running: bool = field(default=False)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout_s: float = 90.0) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(f"{' '.join(command)} failed:\n{exc.stdout.decode()}{exc.stderr.decode()}\n"
                                 f"{tail(self.log)}") from None

    def start(self) -> None:
        self.run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o",
                 f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.base} "
                 "-c fsync=off -c full_page_writes=off")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
        self.running = False


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """initdb + pg_ctl start into a temporary directory; stopped and removed afterwards. Outside CI
    it skips when the PostgreSQL server binaries are missing; in CI (``CI`` set) that fails."""

    def unavailable(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    bindir = _postgres_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH; "
                    "apt-get install postgresql")
    assert bindir is not None
    as_postgres = os.geteuid() == 0
    if as_postgres:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if owner is None or shutil.which("runuser") is None:
            unavailable("running as root, initdb needs the 'postgres' user and runuser")
    # Not under pytest's tmp_path: that is root's, mode 0700, and the postgres user must reach it.
    base = Path(tempfile.mkdtemp(prefix="traice-pg-"))
    if as_postgres:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    pg = PrivatePostgres(bindir, base, free_port(), as_postgres)
    try:
        pg.run("initdb", "-D", str(pg.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _chromium_page(request: pytest.FixtureRequest) -> Any:
    """A Chromium page when Chromium is installed (conftest's ``browser``), else None: the banner
    check is then left out, not the whole test. In CI Chromium is always there."""
    from conftest import CHROMIUM

    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        return None
    return request.getfixturevalue("browser").new_page()


BANNER = re.compile(r"^Database unreachable since \d\d:\d\d:\d\d — reports are held and will be stored when it is back$")


def test_database_outage_holds_reports_and_tells_dashboards(
    tmp_path: Path, private_postgres: PrivatePostgres, request: pytest.FixtureRequest
) -> None:
    pg = private_postgres
    admin = create_engine(normalize_database_url(pg.url()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "traice_outage" WITH (FORCE)'))
            conn.execute(text('CREATE DATABASE "traice_outage"'))
    finally:
        admin.dispose()
    database_url = pg.url("traice_outage")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ws_worker = f"ws://127.0.0.1:{port}/ws/worker"
    started: list[subprocess.Popen[bytes]] = []
    sockets: list[ClientConnection] = []
    dashboards: list[Dashboard] = []
    proxies: list[CuttableProxy] = []
    page = None
    try:
        server, _ = spawn_server(server_args(database_url), tmp_path / "server.log", CHILD_ENV, port)
        started.append(server)
        # Two workers, their connections counted by a proxy (never cut here; it counts only the
        # connections it could pass on to the server). They start with the server and retry until it answers.
        proxy = CuttableProxy(port)
        proxies.append(proxy)
        workers = [start_worker(tmp_path, proxy.url, "outage", node, rounds=100) for node in ("p1", "p2")]
        started += [w.process for w in workers]
        # And one that will say hello only during the outage (in a run of its own: the others may
        # have finished theirs by the time it gets in).
        late_proxy = CuttableProxy(port)
        proxies.append(late_proxy)
        go = tmp_path / "late-worker-go"
        late = start_worker(tmp_path, late_proxy.url, "outage-late", "late", rounds=8, start_when=go)
        started.append(late.process)
        wait_answers(server, url, tmp_path / "server.log")
        log.info("server up")
        dashboard = Dashboard(url)
        dashboards.append(dashboard)
        # A worker socket the test speaks itself, to watch it during the outage.
        raw = dial(ws_worker, max_size=None)
        sockets.append(raw)
        raw.send(json.dumps(hello(run="outage-raw", node_id="raw")))
        raw_run_id = recv_json(raw)["run_id"]
        raw.send(json.dumps(round_msg(1, 1)))
        assert recv_json(raw) == {"type": "ack", "seq": 1}
        page = _chromium_page(request)  # Chromium starts while the workers do
        if page is not None:
            page.goto(url + "/")
            page.wait_for_selector("#live:not(.off)", timeout=30_000)  # the dashboard's socket is open
        log.info("browser ready")
        wait_until(each_has_rounds(url, "outage", ["p1", "p2"], 2), 90, "both workers to have 2 rounds stored")
        log.info("workers started")
        run_id = run_named(url, "outage")["id"]  # type: ignore[index]
        assert dashboard.health() == []

        # ---- the outage
        pg.stop("fast")
        down_at = time.monotonic()
        down_wall = time.time()
        assert all(w.process.poll() is None for w in workers), "the workers must be mid-run when the database goes"
        # Frames from connected workers are still accepted during the outage.
        raw.send(json.dumps(round_msg(2, 2)))
        raw.send(json.dumps(round_msg(3, 3)))

        log.info("database stopped")
        unreachable = dashboard.wait_health(1, 30)[0]
        assert unreachable["run_id"] is None
        assert unreachable["data"]["database"] == "unreachable"
        assert unreachable["data"]["since"]

        health = httpx.get(f"{url}/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["database"] == "unreachable"
        for path in ("/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/rounds", f"/api/runs/{run_id}/clients"):
            answer = httpx.get(f"{url}{path}", timeout=30)
            assert answer.status_code == 503, (path, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "database_unavailable", (path, answer.text)

        # A dashboard that connects during the outage hears of it at once.
        second = Dashboard(url)
        dashboards.append(second)
        assert second.wait_health(1, 10)[0] == unreachable
        assert second.messages[0] == unreachable

        # A hello now is refused with a clear code (and the server stays up).
        refused = dial(ws_worker, max_size=None)
        sockets.append(refused)
        refused.send(json.dumps(hello(run="outage-raw", node_id="refused")))
        error = recv_json(refused)
        assert error["type"] == "error" and error["code"] == "database_unavailable", error
        with pytest.raises(ConnectionClosed):
            refused.recv(timeout=10)

        if page is not None:  # the browser shows a banner
            banner = page.wait_for_selector("#db-health", timeout=30_000)
            assert banner is not None and BANNER.match(banner.inner_text().strip()), banner and banner.inner_text()

        log.info("outage checks done")
        # The late worker says hello only now, late in the outage, so that its backoff is still short
        # when the database is back: it is refused, retries, and gets in then.
        go.touch()
        wait_until(lambda: "database_unavailable" in late.log.read_text(errors="replace"), 60,
                   "the late worker's hello to be refused")
        log.info("late worker refused")
        time.sleep(max(0.0, down_at + 10 - time.monotonic()))  # at least 10 s without a database
        assert all(w.process.poll() is None for w in workers), "the workers must still be running"
        pg.start()
        up_wall = time.time()

        # ---- back
        log.info("database started")
        ok = dashboard.wait_health(2, 30)[1]
        assert ok == {"type": "health", "run_id": None, "data": {"database": "ok"}}
        if page is not None:  # and takes it down
            page.wait_for_selector("#db-health", state="detached", timeout=30_000)
        # The raw socket stayed up through the outage: its frames are now stored and acknowledged.
        assert acked_up_to(raw, 3, timeout_s=30)
        raw.send(json.dumps({"type": "bye", "seq": 4}))
        assert recv_json(raw, timeout=30) == {"type": "ack", "seq": 4}

        log.info("raw socket acked")
        results = [w.result(timeout_s=120) for w in workers]
        late_result = late.result(timeout_s=120)
        log.info("workers done")
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        assert proxy.forwarded == 2, "each worker kept its one socket through the outage"
        assert late_proxy.forwarded >= 2, "the late worker was refused, then got in"
        for result in results:
            assert produced_between(result, down_wall, up_wall) > 0, "the workers reported during the outage"
        assert_stored_exactly_once(database_url, url, results)
        assert_stored_exactly_once(database_url, url, [late_result])
        engine = create_engine(normalize_database_url(database_url))
        try:
            with engine.connect() as conn:
                raw_rounds = sorted(conn.execute(select(reports.c.round).where(reports.c.run_id == raw_run_id)).scalars())
                run_status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
        finally:
            engine.dispose()
        assert raw_rounds == [1, 2, 3]
        assert run_status == "finished"
        # Told once that it went, once that it came back.
        assert [h["data"]["database"] for h in dashboard.health()] == ["unreachable", "ok"]
    finally:
        if page is not None:
            with contextlib.suppress(Exception):
                page.close()
        for board in dashboards:
            board.close()
        for ws in sockets:
            with contextlib.suppress(Exception):
                ws.close()
        for process in started:
            kill_group(process)
        for each in proxies:
            each.close()
        if not pg.running:
            with contextlib.suppress(Exception):
                pg.start()
