"""Ingest benchmark: many live workers streaming samples to a real TRAICE server, on loopback.

For each configuration (target x number of workers) this starts, as separate processes:

* the server: ``python -m traice server`` on SQLite or PostgreSQL, or the *ceiling*, a bare
  ``websockets`` asyncio server that only parses the same frames (``json.loads`` and
  ``protocol.parse_worker_message``) and replies with the same cumulative acks;
* one dashboard socket on ``/ws/dashboard`` (TRAICE only), which timestamps every sample it hears;
* one or more load generators (asyncio + the ``websockets`` client), which open N worker sockets,
  say ``hello`` on each (unique node_id, one run) and then run two phases on the same sockets:

  1. **saturation** (closed loop): every socket keeps up to W unacknowledged samples in flight
     (W = ceil(--inflight / N)) and sends the next one as soon as an ack makes room. The server
     is the bottleneck, so the rate it acks (and, for TRAICE, the rate rows appear in the
     database) is its maximum sustained rate. TRAICE and the ceiling are compared on this rate.
  2. **latency** (open loop, one phase per offered load): every socket sends one sample every
     N/R seconds, phases staggered, so the offered load is a steady R samples/s, below saturation
     (R = each of --latency-loads x the saturated rate TRAICE reached in the same configuration,
     or each of --latency-rates; the ceiling runs at the rates TRAICE-SQLite ran). Latency is
     from the worker's send (the sample's ``t``, taken just before the write) to the dashboard
     socket's receipt of that sample, and from the send to the worker's receipt of its ack.

Only the middle --duration seconds of a phase count (after --warmup); afterwards each phase
waits for every sample in flight to be acknowledged. At the end the stored rows are counted in
the database and compared with what was sent and acknowledged. Server RSS is sampled every
0.5 s; CPU time of every process (and of the whole machine, to show others' load) is read at the
edges of each measured window.

    python bench/bench_ingest.py                                # 1,000 and 10,000 workers, all targets
    python bench/bench_ingest.py --clients 1000 --targets ceiling,sqlite --duration 10
    python bench/bench_ingest.py --json results.json

PostgreSQL: a scratch database is created on --postgres-url's server and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from array import array
from collections import Counter, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
LOCATION = {"country_iso_code": "FRA", "intensity_g_per_kwh": 56.0, "intensity_source": "bench"}
#: Same keys and order as TraiceClient's live samples (the transport appends ``seq``).
SAMPLE = '{"type":"sample","t":%.6f,"cpu_w":%.3f,"gpu_w":0.0,"ram_w":3.1,"seq":%d}'


def _pct(values: list[float] | array, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def _latency_summary(values: list[float] | array) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": None if not values else round(1000 * _pct(values, 50), 2),  # type: ignore[operator]
        "p99_ms": None if not values else round(1000 * _pct(values, 99), 2),  # type: ignore[operator]
        "max_ms": None if not values else round(1000 * max(values), 2),
    }


def _emit(kind: str, **data: Any) -> None:
    """A line for the orchestrator (stdout is the control channel of the helper processes)."""
    sys.stdout.write("@@" + json.dumps({"kind": kind, **data}) + "\n")
    sys.stdout.flush()


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# =============================================================================== load generator


class _Phase:
    """Counters of the phase in progress, shared by all the generator's sockets."""

    def __init__(self, m0: float = math.inf, m1: float = math.inf) -> None:
        self.m0, self.m1 = m0, m1  # the measured window (unix time)
        self.sent = self.sent_window = self.acked = self.acked_window = 0
        self.ack_latency: array = array("d")
        self.behind_max = 0.0


class _Worker:
    __slots__ = ("gen", "index", "inflight", "node_id", "reader", "seq", "wake", "ws")

    def __init__(self, gen: _Generator, index: int) -> None:
        self.gen = gen
        self.index = index
        self.node_id = f"bench-{index}"
        self.ws: Any = None
        self.seq = 0
        self.inflight: deque[tuple[int, float]] = deque()
        self.wake = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def connect(self, sem: asyncio.Semaphore) -> None:
        from websockets.asyncio.client import connect

        from traice import protocol

        a = self.gen.args
        hello = protocol.Hello(run=a.run, node_id=self.node_id, session=uuid.uuid4().hex,
                               location=protocol.Location(**LOCATION), sdk_version="bench")
        async with sem:
            self.ws = await connect(
                a.url, open_timeout=a.connect_timeout, ping_interval=None, close_timeout=2,
                compression=None if a.compression == "none" else "deflate", max_size=protocol.MAX_FRAME_BYTES,
            )
            await self.ws.send(protocol.dumps(hello))
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), a.connect_timeout))
            if reply.get("type") != "ack":
                await self.ws.close()
                raise RuntimeError(f"hello refused: {reply.get('code')}")
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        gen = self.gen
        try:
            async for frame in self.ws:
                message = json.loads(frame)
                kind = message.get("type")
                if kind == "ack":
                    seq, now, phase, inflight = message["seq"], time.time(), gen.phase, self.inflight
                    while inflight and inflight[0][0] <= seq:
                        _, sent_at = inflight.popleft()
                        phase.acked += 1
                        gen.acked_total += 1
                        if phase.m0 <= now < phase.m1:
                            phase.acked_window += 1
                        if phase.m0 <= sent_at < phase.m1:
                            phase.ack_latency.append(now - sent_at)
                    self.wake.set()
                elif kind == "error":
                    gen.errors[str(message.get("code"))] += 1
        except Exception as exc:  # noqa: BLE001 -- the connection closed or failed: count it
            gen.errors[f"closed:{type(exc).__name__}"] += 1
        finally:
            gen.lost_sockets += 1 if not gen.closing else 0
            self.wake.set()

    async def _send_one(self, phase: _Phase) -> None:
        self.seq += 1
        t = time.time()
        self.inflight.append((self.seq, t))
        await self.ws.send(SAMPLE % (t, 10.0 + (self.seq % 7), self.seq))
        phase.sent += 1
        self.gen.sent_total += 1
        if phase.m0 <= t < phase.m1:
            phase.sent_window += 1

    async def closed_loop(self, phase: _Phase, window: int, start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, start - time.time()))
        while time.time() < end and self.reader is not None and not self.reader.done():
            if len(self.inflight) >= window:
                self.wake.clear()
                await self.wake.wait()  # an ack, the end of the phase, or the socket closing
                continue
            await self._send_one(phase)

    async def open_loop(self, phase: _Phase, interval: float, first: float, end: float) -> None:
        due = first
        while due < end and self.reader is not None and not self.reader.done():
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > phase.behind_max:
                phase.behind_max = -delay
            await self._send_one(phase)
            due += interval


class _Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workers = [_Worker(self, args.first + i) for i in range(args.count)]
        self.phase = _Phase()
        self.errors: Counter[str] = Counter()
        self.sent_total = self.acked_total = 0
        self.lost_sockets = 0
        self.closing = False

    @property
    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.reader is not None and not w.reader.done()]

    async def connect_all(self) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.args.connect_concurrency)
        started = time.monotonic()
        tasks = [asyncio.create_task(w.connect(sem)) for w in self.workers]
        done, pending = await asyncio.wait(tasks, timeout=self.args.connect_total_timeout)
        for task in pending:
            task.cancel()
        failures = Counter(type(t.exception()).__name__ for t in done if t.exception() is not None)
        return {"connected": len(self.live), "failed": dict(failures), "timed_out": len(pending),
                "seconds": round(time.monotonic() - started, 2)}

    async def run_phase(self, cmd: dict[str, Any]) -> dict[str, Any]:
        start, warmup, duration = cmd["start"], cmd["warmup"], cmd["duration"]
        end = start + warmup + duration
        self.phase = phase = _Phase(start + warmup, end)
        workers = self.live
        if cmd["mode"] == "closed":
            coros = [w.closed_loop(phase, cmd["window"], start, end) for w in workers]
        else:
            interval = cmd["sockets_total"] / cmd["rate"]  # every socket of every generator, same rate
            coros = [w.open_loop(phase, interval, start + interval * (w.index / cmd["sockets_total"]), end)
                     for w in workers]
        tasks = [asyncio.create_task(c) for c in coros]

        async def stop_at_end() -> None:
            await asyncio.sleep(max(0.0, end - time.time()))
            for w in workers:
                w.wake.set()

        stopper = asyncio.create_task(stop_at_end())
        await asyncio.wait(tasks, timeout=warmup + duration + 30 + max(0.0, start - time.time()))
        for task in tasks:
            task.cancel()
        stopper.cancel()
        drain_started = time.time()
        while any(w.inflight for w in self.live) and time.time() - drain_started < self.args.drain_timeout:
            await asyncio.sleep(0.1)
        unacked = sum(len(w.inflight) for w in self.workers)
        return {
            "name": cmd["name"], "sent": phase.sent, "sent_window": phase.sent_window, "acked": phase.acked,
            "acked_window": phase.acked_window, "window_s": duration,
            "ack_latency": _latency_summary(phase.ack_latency), "behind_max_s": round(phase.behind_max, 3),
            "drain_s": round(time.time() - drain_started, 2), "unacked_after_drain": unacked,
            "sockets": len(self.live),
        }

    async def close_all(self) -> dict[str, Any]:
        self.closing = True
        sem = asyncio.Semaphore(500)

        async def close(w: _Worker) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await w.ws.close()

        closing = [asyncio.create_task(close(w)) for w in self.workers if w.ws is not None]
        if closing:
            await asyncio.wait(closing, timeout=60)
        for w in self.workers:
            if w.reader is not None:
                w.reader.cancel()
        return {"sent_total": self.sent_total, "acked_total": self.acked_total,
                "unacked": sum(len(w.inflight) for w in self.workers), "errors": dict(self.errors),
                "sockets_lost_during_run": self.lost_sockets}


async def _generator_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "close"})

    threading.Thread(target=read_stdin, daemon=True).start()
    gen = _Generator(args)
    connected = await gen.connect_all()
    gc.collect()
    gc.freeze()  # thousands of long-lived sockets: keep the collector's full passes off the latency
    _emit("connected", **connected)
    while True:
        cmd = await commands.get()
        if cmd["cmd"] == "phase":
            _emit("phase", **await gen.run_phase(cmd))
        else:
            _emit("closed", **await gen.close_all())
            return


# =============================================================================== ceiling server


async def _ceiling_main(args: argparse.Namespace) -> None:
    """A bare websockets server: parse and validate each frame, reply with cumulative acks."""
    from websockets.asyncio.server import serve

    from traice import protocol
    from traice.protocol import Ack, Hello, ProtocolError

    async def handler(ws: Any) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), 30)
            hello = protocol.parse_worker_message(first)
            if not isinstance(hello, Hello):
                raise ProtocolError("hello_required", "the first message must be a hello")
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                await ws.send(protocol.dumps(exc.to_message()))
            return
        except Exception:  # noqa: BLE001 -- no hello (timeout, closed): drop the socket
            return
        await ws.send(protocol.dumps(Ack(seq=hello.seq, run_id=1)))
        state = {"last": hello.seq, "acked": hello.seq}
        wake = asyncio.Event()

        async def acker() -> None:  # as TRAICE's ack loop: one ack covers all that arrived meanwhile
            while True:
                await wake.wait()
                wake.clear()
                if state["last"] > state["acked"]:
                    state["acked"] = state["last"]
                    await ws.send(protocol.dumps(Ack(seq=state["last"])))

        task = asyncio.create_task(acker())
        try:
            async for frame in ws:
                try:
                    message = protocol.parse_worker_message(frame)
                    if isinstance(message, Hello):
                        raise ProtocolError("duplicate_hello", "hello was already received", message.seq)
                except ProtocolError as exc:
                    await ws.send(protocol.dumps(exc.to_message()))
                    continue
                state["last"] = message.seq
                wake.set()
        except Exception:  # noqa: BLE001, S110 -- the peer went away; nothing to report
            pass
        finally:
            task.cancel()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with serve(handler, "127.0.0.1", args.port, max_size=protocol.MAX_FRAME_BYTES, backlog=2048,
                     ping_interval=20, ping_timeout=20,
                     compression=None if args.compression == "none" else "deflate"):
        _emit("ready")
        await stop.wait()


# =============================================================================== dashboard socket


async def _dashboard_main(args: argparse.Namespace) -> None:
    """Listen on /ws/dashboard; on SIGTERM write (t sent, latency) of every sample heard."""
    from websockets.asyncio.client import connect

    sent_at, latency = array("d"), array("d")
    kinds: Counter[str] = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ws = await connect(args.url, open_timeout=10, ping_interval=None, max_size=None,
                       compression=None if args.compression == "none" else "deflate")

    async def listen() -> None:
        with contextlib.suppress(Exception):
            async for frame in ws:
                now = time.time()
                message = json.loads(frame)
                # The events of one committed batch come in one frame (docs/protocol.md).
                for event in message["events"] if message["type"] == "batch" else [message]:
                    kinds[event["type"]] += 1
                    if event["type"] == "sample":
                        t = datetime.fromisoformat(event["data"]["t"]).timestamp()
                        sent_at.append(t)
                        latency.append(now - t)

    task = asyncio.create_task(listen())
    _emit("ready")
    await stop.wait()
    task.cancel()
    with open(args.out, "wb") as f:  # noqa: ASYNC230 -- the last thing this process does
        sent_at.tofile(f)
        latency.tofile(f)
    _emit("done", kinds=dict(kinds), samples=len(sent_at))


# =============================================================================== orchestrator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """A helper process in its own process group, killed as a group at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 stdin: bool = False, log: Path | None = None) -> None:
        self.name = name
        self.log = log
        stderr = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=stderr, env=env, start_new_session=True, text=True, bufsize=1,
        )
        self.lines: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("@@"):
                with self._cond:
                    self.lines.append(json.loads(line[2:]))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self.lines:
                    line = self.lines.popleft()
                    if line["kind"] == kind:
                        return line
                if self.popen.poll() is not None and not self.lines:
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}); see {self.log}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no {kind!r} within {timeout:.0f} s")
                self._cond.wait(min(remaining, 0.5))

    def send(self, command: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.send_signal(signal.SIGKILL)  # anything left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


class _Monitor:
    """Samples the server's RSS every 0.5 s; snapshots CPU times at the edges of a window."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.psutil = psutil
        self.server = psutil.Process(server_pid)
        self.peak_rss = 0
        self.rss_now = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.rss_now = self.server.memory_info().rss
                self.peak_rss = max(self.peak_rss, self.rss_now)
            self._stop.wait(0.5)

    def rss(self) -> int:
        with contextlib.suppress(Exception):
            return int(self.server.memory_info().rss)
        return 0

    def cpu(self, pids: dict[str, list[int]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, group in pids.items():
            total = 0.0
            for pid in group:
                with contextlib.suppress(Exception):
                    t = self.psutil.Process(pid).cpu_times()
                    total += t.user + t.system
            out[name] = total
        m = self.psutil.cpu_times()
        out["machine"] = m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0)
        out["wall"] = time.time()
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class _Database:
    """The scratch database of one TRAICE configuration: its URL, row counts, and clean-up."""

    def __init__(self, kind: str, args: argparse.Namespace, tag: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.dir = Path(tempfile.mkdtemp(prefix="traice-bench-"))
            self.path = self.dir / "bench.db"
            self.url = f"sqlite:///{self.path}"
        else:
            import psycopg

            self.name = f"traice_bench_{os.getpid()}_{tag}"
            self.admin = args.postgres_url
            with psycopg.connect(self.admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = self.admin.rsplit("/", 1)[0] + "/" + self.name
        self._conn: Any = None

    def _connect(self) -> Any:
        if self._conn is None:
            if self.kind == "sqlite":
                import sqlite3

                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            else:
                import psycopg

                self._conn = psycopg.connect(self.url, autocommit=True)
        return self._conn

    def scalar(self, sql: str) -> int:
        cur = self._connect().execute(sql)
        value = cur.fetchone()[0]
        return int(value or 0)

    def backend_pids(self) -> list[int]:
        if self.kind != "postgresql":
            return []
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                (self.name,)).fetchall()
        own = self._conn.info.backend_pid if self._conn is not None else None
        return [r[0] for r in rows if r[0] != own]

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        if self.kind == "sqlite":
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            import psycopg

            with contextlib.suppress(Exception), psycopg.connect(self.admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _wait_http(url: str, timeout: float, proc: _Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"server exited ({proc.popen.returncode}); see {proc.log}")
        with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up within {timeout:.0f} s")


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    wall = b["wall"] - a["wall"]
    return {k: round((b[k] - a[k]) / wall, 3) for k in a if k != "wall"}  # cores busy (1.0 = one core)


def run_config(target: str, clients: int, args: argparse.Namespace, latency_rates: list[float] | None,
               workdir: Path) -> dict[str, Any]:
    """One target with one number of workers: start everything, run both phases, tear down."""
    py = sys.executable
    port = _free_port()
    tag = f"{target}-{clients}"
    result: dict[str, Any] = {"target": target, "clients": clients, "generators": args.generators,
                              "compression": args.compression}
    procs: list[_Proc] = []
    db: _Database | None = None
    monitor: _Monitor | None = None
    dash_file = workdir / f"dashboard-{tag}.bin"
    try:
        # ---------------------------------------------------------------- the server
        if target == "ceiling":
            server = _Proc("ceiling", [py, str(HERE), "--role", "ceiling", "--port", str(port),
                                       "--compression", args.compression],
                           log=workdir / f"server-{tag}.log")
            procs.append(server)
            server.expect("ready", 30)
        else:
            db = _Database(target, args, str(clients))
            env = {**os.environ, "TRAICE_MAX_CONNECTIONS_PER_ADDRESS": "100000",
                   "TRAICE_MAX_MESSAGES_PER_S": "100000", "FLWR_TELEMETRY_ENABLED": "0"}
            env.pop("TRAICE_ADMIN_TOKEN", None)
            env.pop("TRAICE_WORKER_TOKEN", None)
            server = _Proc("server", [py, "-m", "traice", "server", "--host", "127.0.0.1", "--port", str(port),
                                      "--database-url", db.url, "--log-level", "warning"],
                           env=env, log=workdir / f"server-{tag}.log")
            procs.append(server)
            _wait_http(f"http://127.0.0.1:{port}/healthz", 60, server)
        monitor = _Monitor(server.pid)
        result["rss_idle_mb"] = round(monitor.rss() / 2**20, 1)
        dash: _Proc | None = None
        if target != "ceiling":
            dash = _Proc("dashboard", [py, str(HERE), "--role", "dashboard", "--url",
                                       f"ws://127.0.0.1:{port}/ws/dashboard", "--out", str(dash_file),
                                       "--compression", args.compression],
                         log=workdir / f"dashboard-{tag}.log")
            procs.append(dash)
            dash.expect("ready", 30)

        # ---------------------------------------------------------------- workers connect
        run_name = f"bench-ingest-{clients}"
        gens: list[_Proc] = []
        share = [clients // args.generators + (1 if i < clients % args.generators else 0)
                 for i in range(args.generators)]
        first = 0
        for i, count in enumerate(share):
            gens.append(_Proc(f"generator{i}", [
                py, str(HERE), "--role", "generator", "--url", f"ws://127.0.0.1:{port}/ws/worker",
                "--run", run_name, "--first", str(first), "--count", str(count),
                "--connect-timeout", str(args.connect_timeout), "--connect-concurrency",
                str(max(1, args.connect_concurrency // args.generators)), "--connect-total-timeout",
                str(args.connect_total_timeout), "--drain-timeout", str(args.drain_timeout),
                "--compression", args.compression,
            ], stdin=True, log=workdir / f"generator{i}-{tag}.log"))
            first += count
        procs.extend(gens)
        connected = [g.expect("connected", args.connect_total_timeout + 30) for g in gens]
        result["connect"] = {
            "connected": sum(c["connected"] for c in connected),
            "seconds": max(c["seconds"] for c in connected),
            "failed": dict(sum((Counter(c["failed"]) for c in connected), Counter())),
            "timed_out": sum(c["timed_out"] for c in connected),
        }
        sockets = result["connect"]["connected"]
        if sockets == 0:
            raise RuntimeError("no worker could connect")
        # Let the server finish the hellos (and the goodbyes of any socket that timed out) first.
        settle_until = time.monotonic() + 120
        last, stable_since = -1, time.monotonic()
        while db is not None and time.monotonic() < settle_until:
            now_count = db.scalar("SELECT count(*) FROM clients WHERE status = 'online'")
            if now_count != last:
                last, stable_since = now_count, time.monotonic()
            elif time.monotonic() - stable_since > 2.0:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        result["rss_connected_mb"] = round(monitor.rss() / 2**20, 1)
        pids = {"server": [server.pid], "generators": [g.pid for g in gens]}
        if dash is not None:
            pids["dashboard"] = [dash.pid]
        if db is not None and db.kind == "postgresql":
            pids["postgres"] = db.backend_pids()

        # ---------------------------------------------------------------- phases
        def phase(name: str, mode: str, **extra: Any) -> dict[str, Any]:
            start = time.time() + 0.5
            m0, m1 = start + args.warmup, start + args.warmup + args.duration
            for g in gens:
                g.send({"cmd": "phase", "name": name, "mode": mode, "start": start, "warmup": args.warmup,
                        "duration": args.duration, "sockets_total": sockets, **extra})
            _sleep_until(m0)
            rows0 = db.scalar("SELECT max(id) FROM samples") if db else 0
            cpu0 = monitor.cpu(pids)
            _sleep_until(m1)
            cpu1 = monitor.cpu(pids)
            rows1 = db.scalar("SELECT max(id) FROM samples") if db else 0
            rss_end = monitor.rss()
            parts = [g.expect("phase", args.duration + args.warmup + args.drain_timeout + 60) for g in gens]
            acked_window = sum(p["acked_window"] for p in parts)
            lat = [p["ack_latency"] for p in parts]
            out = {
                "name": name, "mode": mode, **extra, "window": (m0, m1),
                "sent_per_s": round(sum(p["sent_window"] for p in parts) / args.duration, 1),
                "acked_per_s": round(acked_window / args.duration, 1),
                "stored_per_s": round((rows1 - rows0) / args.duration, 1) if db else None,
                # several generators: the worst of their percentiles (each has its own sockets)
                "ack_latency": {k: (max(x[k] for x in lat if x[k] is not None) if any(x[k] is not None for x in lat)
                                    else None) for k in ("p50_ms", "p99_ms", "max_ms")},
                "behind_max_s": max(p["behind_max_s"] for p in parts),
                "unacked_after_drain": sum(p["unacked_after_drain"] for p in parts),
                "drain_s": max(p["drain_s"] for p in parts),
                "cpu_cores": _cpu_delta(cpu0, cpu1),
                "rss_end_mb": round(rss_end / 2**20, 1),
            }
            busy = out["cpu_cores"]
            ours = sum(v for k, v in busy.items() if k != "machine")
            busy["others"] = round(max(0.0, busy["machine"] - ours), 3)
            rate = out["stored_per_s"] if db else out["acked_per_s"]
            if rate:
                out["server_cpu_us_per_sample"] = round(1e6 * busy["server"] / rate, 1)
                if "postgres" in busy:
                    out["server_and_postgres_cpu_us_per_sample"] = round(
                        1e6 * (busy["server"] + busy["postgres"]) / rate, 1)
            return out

        window = max(1, math.ceil(args.inflight / sockets))
        saturation = phase("saturation", "closed", window=window)
        result["saturation"] = saturation
        rates = latency_rates
        if not rates:
            measured = saturation["stored_per_s"] or saturation["acked_per_s"]
            rates = [max(1.0, round(load * measured, -1 if load * measured > 100 else 0))
                     for load in args.latency_loads]
        result["latency"] = []
        for rate in rates:
            lat = phase(f"latency@{rate:g}", "open", rate=rate / args.generators)
            lat["offered_per_s"] = rate
            result["latency"].append(lat)

        # ---------------------------------------------------------------- tear down, then count
        for g in gens:
            g.send({"cmd": "close"})
        closed = [g.expect("closed", 120) for g in gens]
        result["sent_total"] = sum(c["sent_total"] for c in closed)
        result["acked_total"] = sum(c["acked_total"] for c in closed)
        result["errors"] = dict(sum((Counter(c["errors"]) for c in closed), Counter()))
        result["sockets_lost_during_run"] = sum(c["sockets_lost_during_run"] for c in closed)
        result["rss_peak_mb"] = round(monitor.peak_rss / 2**20, 1)
        if db is not None:
            time.sleep(1.0)
            result["stored_total"] = db.scalar("SELECT count(*) FROM samples")
            result["clients_stored"] = db.scalar("SELECT count(*) FROM clients")
        if dash is not None:
            dash.send_signal(signal.SIGTERM)
            done = dash.expect("done", 30)
            raw = array("d")
            with open(dash_file, "rb") as f:
                raw.frombytes(f.read())
            half = len(raw) // 2
            sent_at, latency = raw[:half], raw[half:]
            result["dashboard_samples_heard"] = done["samples"]
            for part in [result["saturation"], *result["latency"]]:
                m0, m1 = part["window"]
                heard = [latency[i] for i in range(half) if m0 <= sent_at[i] < m1]
                part["dashboard_latency"] = _latency_summary(heard)
                part["dashboard_heard_per_s"] = round(len(heard) / args.duration, 1)
        return result
    finally:
        if monitor is not None:
            monitor.close()
        for proc in reversed(procs):
            proc.stop(signal.SIGINT if proc.name == "server" else signal.SIGTERM)
        if db is not None:
            db.drop()
        with contextlib.suppress(OSError):
            dash_file.unlink()


# =============================================================================== report


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def print_summary(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ceilings = {r["clients"]: r["saturation"]["acked_per_s"] for r in results if r["target"] == "ceiling"}
    print()
    print(f"Saturation (closed loop, ~{args.inflight} samples in flight in all), measured over {args.duration:g} s")
    head = (f"{'target':<10} {'sockets':>7} {'connect s':>9} {'stored/s':>9} {'acked/s':>9} {'of ceiling':>10} "
            f"{'srv cores':>9} {'srv us/msg':>10} {'gen cores':>9} {'others':>6} {'ack p50/p99 ms':>15} "
            f"{'dash p50/p99 ms':>16}")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["saturation"]
        rate = s["stored_per_s"] if s["stored_per_s"] is not None else s["acked_per_s"]
        ceiling = ceilings.get(r["clients"])
        frac = f"{100 * rate / ceiling:.0f} %" if ceiling and r["target"] != "ceiling" else "–"
        c = s["cpu_cores"]
        d = s.get("dashboard_latency", {})
        print(f"{r['target']:<10} {r['connect']['connected']:>7,} {r['connect']['seconds']:>9.1f} {_fmt(s['stored_per_s']):>9} "
              f"{_fmt(s['acked_per_s']):>9} {frac:>10} {c['server']:>9.2f} "
              f"{_fmt(s.get('server_cpu_us_per_sample'), '.0f'):>10} {c['generators']:>9.2f} {c['others']:>6.2f} "
              f"{_fmt(s['ack_latency']['p50_ms'], '.0f')+'/'+_fmt(s['ack_latency']['p99_ms'], '.0f'):>15} "
              f"{_fmt(d.get('p50_ms'), '.0f')+'/'+_fmt(d.get('p99_ms'), '.0f'):>16}")
    print()
    print(f"Latency (open loop, steady offered load), measured over {args.duration:g} s")
    head = (f"{'target':<10} {'clients':>7} {'offered/s':>9} {'sent/s':>8} {'stored/s':>9} {'heard/s':>8} "
            f"{'dash p50 ms':>11} {'dash p99 ms':>11} {'dash max':>8} {'ack p50':>7} {'ack p99':>7} "
            f"{'srv cores':>9} {'others':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        for s in r["latency"]:
            d = s.get("dashboard_latency", {})
            print(f"{r['target']:<10} {r['clients']:>7,} {s['offered_per_s']:>9,.0f} {s['sent_per_s']:>8,.0f} "
                  f"{_fmt(s['stored_per_s']):>9} {_fmt(s.get('dashboard_heard_per_s')):>8} "
                  f"{_fmt(d.get('p50_ms'), '.1f'):>11} {_fmt(d.get('p99_ms'), '.1f'):>11} "
                  f"{_fmt(d.get('max_ms'), '.0f'):>8} {_fmt(s['ack_latency']['p50_ms'], '.1f'):>7} "
                  f"{_fmt(s['ack_latency']['p99_ms'], '.1f'):>7} {s['cpu_cores']['server']:>9.2f} "
                  f"{s['cpu_cores']['others']:>6.2f}")
    print()
    print("Server memory and completeness")
    head = (f"{'target':<10} {'clients':>7} {'RSS idle MB':>11} {'connected':>9} {'peak':>7} {'sent':>10} "
            f"{'acked':>10} {'stored':>10} {'errors'}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['target']:<10} {r['clients']:>7,} {r['rss_idle_mb']:>11.0f} {r['rss_connected_mb']:>9.0f} "
              f"{r['rss_peak_mb']:>7.0f} {r['sent_total']:>10,} {r['acked_total']:>10,} "
              f"{_fmt(r.get('stored_total'), ','):>10} {r['errors'] or 'none'}")
    print()
    for r in results:
        if r["target"] == "ceiling" or r["clients"] != 1000:
            continue
        s = r["saturation"]
        ceiling = ceilings.get(1000)
        rate = s["stored_per_s"] or 0
        frac = rate / ceiling if ceiling else None
        print(f"targets at 1,000 clients, {r['target']}: throughput "
              + ("–" if frac is None else f"{100 * frac:.0f} % of ceiling ({'met' if frac >= 0.30 else 'MISSED'})")
              + "; dashboard p99 " + ", ".join(
                  f"{_fmt(lat.get('dashboard_latency', {}).get('p99_ms'), '.1f')} ms at {lat['offered_per_s']:,.0f}/s"
                  + ("" if lat.get("dashboard_latency", {}).get("p99_ms") is None else
                     f" ({'met' if lat['dashboard_latency']['p99_ms'] < 100 else 'MISSED'})")
                  for lat in r["latency"]))


# =============================================================================== main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,10000", help="numbers of worker sockets, comma-separated")
    parser.add_argument("--targets", default="ceiling,sqlite,postgres",
                        help="comma-separated: ceiling, sqlite, postgres (each run for every --clients)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured window")
    parser.add_argument("--inflight", type=int, default=8000,
                        help="saturation: unacknowledged samples in flight over all sockets (>= 1 per socket)")
    parser.add_argument("--latency-loads", default="0.1,0.5",
                        help="latency phases: offered loads as fractions of TRAICE's saturated rate in the same "
                        "configuration, comma-separated")
    parser.add_argument("--latency-rates", default=None,
                        help="latency phases: offered samples/s over all sockets, comma-separated "
                        "(overrides --latency-loads)")
    parser.add_argument("--generators", type=int, default=1, help="load generator processes")
    parser.add_argument("--compression", choices=["deflate", "none"], default="deflate",
                        help="permessage-deflate, as TraiceClient negotiates by default")
    parser.add_argument("--connect-timeout", type=float, default=20.0, help="seconds for one socket and its hello")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="handshakes in progress at once")
    parser.add_argument("--connect-total-timeout", type=float, default=300.0, help="seconds to connect them all")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds a phase waits for its in-flight samples to be acknowledged")
    parser.add_argument("--postgres-url", default=os.environ.get("TRAICE_TEST_POSTGRES_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"),
                        help="PostgreSQL server (a scratch database is created there and dropped)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    # the helper processes this script starts
    parser.add_argument("--role", choices=["generator", "ceiling", "dashboard"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:
        _use_uvloop()
        entry = {"generator": _generator_main, "ceiling": _ceiling_main, "dashboard": _dashboard_main}[args.role]
        asyncio.run(entry(args))
        return

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args.latency_loads = [float(x) for x in args.latency_loads.split(",") if x.strip()]
    args.latency_rates = [float(x) for x in args.latency_rates.split(",") if x.strip()] if args.latency_rates else None
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"ceiling", "sqlite", "postgres"}
    if unknown or not counts or min(counts) < 1:
        parser.error(f"bad --targets {sorted(unknown)} or --clients")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(counts) + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))  # inherited by the helpers
        if min(need, hard) < need:
            print(f"warning: open files limit {hard} < {need}: some sockets may fail", file=sys.stderr)
    started = datetime.now(timezone.utc)
    print(f"bench_ingest {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.2f}; targets {targets}, clients {counts}")
    workdir = Path(tempfile.mkdtemp(prefix="traice-bench-ingest-"))
    results: list[dict[str, Any]] = []
    for clients in counts:
        sqlite_rates: list[float] | None = None
        # TRAICE first: the ceiling's latency phase then runs at the offered load TRAICE-SQLite had.
        order = [t for t in ("sqlite", "postgres", "ceiling") if t in targets]
        for target in order:
            print(f"\n== {target}, {clients:,} workers", flush=True)
            rates = args.latency_rates or (sqlite_rates if target == "ceiling" else None)
            try:
                r = run_config("postgresql" if target == "postgres" else target, clients, args, rates, workdir)
            except Exception as exc:  # noqa: BLE001 -- one failed configuration must not hide the others
                print(f"   FAILED: {type(exc).__name__}: {exc} (logs in {workdir})", flush=True)
                continue
            r["target"] = target
            if target == "sqlite" and r["connect"]["connected"] == clients:
                sqlite_rates = [lat["offered_per_s"] for lat in r["latency"]]
            s = r["saturation"]
            print(f"   connected {r['connect']['connected']:,} in {r['connect']['seconds']:.1f} s; saturation "
                  f"{_fmt(s['stored_per_s'] if s['stored_per_s'] is not None else s['acked_per_s'])}/s; "
                  + "; ".join(f"at {lat['offered_per_s']:,.0f}/s dashboard p99 "
                              f"{_fmt(lat.get('dashboard_latency', {}).get('p99_ms'), '.1f')} ms, ack p99 "
                              f"{_fmt(lat['ack_latency']['p99_ms'], '.1f')} ms" for lat in r["latency"])
                  + f"; RSS peak {r['rss_peak_mb']:.0f} MB", flush=True)
            results.append(r)
    if not results:
        sys.exit("no configuration completed")
    results.sort(key=lambda r: (r["clients"], ["ceiling", "sqlite", "postgres"].index(r["target"])))
    print_summary(results, args)
    if args.json:
        args.json.write_text(json.dumps({"started": started.isoformat(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None},
            "results": results}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
