#!/usr/bin/env python3
"""Start the TRAICE quickstart's FL server: a Flower SuperLink, then the app once the workers are in.

    traice server                        # terminal 1: TRAICE (dashboard on http://127.0.0.1:3000)
    python server.py                     # terminal 2: SuperLink, waits for 3 workers
    python worker.py --node-id 0         # terminals 3, 4, 5: the workers (or on other machines)
    python worker.py --node-id 1
    python worker.py --node-id 2

This script starts ``flower-superlink`` (Flower's deployment engine; the workers' SuperNodes
connect to it over HTTP), waits until ``--workers`` SuperNodes are online, submits the app in
this folder with ``flwr run ... --stream``, prints its progress, and stops the SuperLink at
the end or on Ctrl-C. The workers notice and stop too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent  # the Flower app: pyproject.toml and the quickstart package
CONNECTION = "quickstart"  # name of the SuperLink connection in the private FLWR_HOME
RUN_ID = re.compile(r"\brun(?: ID)?:?\s+(\d{2,})\b", re.IGNORECASE)
NAME = re.compile(r"^[A-Za-z0-9_.:@/-]+$")  # goes into --run-config: no spaces or quotes


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Failed(Exception):
    """A step failed; the message says what to do."""


def say(text: str) -> None:
    print(f"[server] {text}", flush=True)


def executable(name: str) -> str:
    """``name`` next to this Python first (a venv that is not activated), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise Failed(f"{name} not found: install Flower in this Python, e.g. pip install 'traice[demo]'")
    return found


def reachable(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def local_address(host: str, port: int) -> str:
    """Where this machine reaches a server listening on ``host``."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def toml_string(value: str) -> str:
    return '"' + value + '"'


def descendants(pid: int) -> list[Any]:
    try:
        import psutil  # installed with traice (codecarbon needs it)

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:
        return []


def stop_group(process: subprocess.Popen[Any], name: str, grace_s: float = 15.0) -> None:
    """SIGTERM ``process``'s group, wait, then SIGKILL what is left, including detached children.

    The SuperLink runs its SuperExec (which runs the ServerApp) in a session of its own; those
    exit when their parent does, and are waited for (killed after ``grace_s``) here.
    """
    children = descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {grace_s:.0f} s; killing it")
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except Exception:
            try:
                child.kill()
                child.wait(5)
            except Exception:
                pass


class Quickstart:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.address = local_address(args.host, args.port)
        self.workdir = Path(tempfile.mkdtemp(prefix="traice-quickstart-"))
        self.log_path = self.workdir / "superlink.log"
        self.env = dict(os.environ)
        self.env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        self.env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        # The SuperLink finds flower-superexec and flwr-serverapp on PATH.
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHONUNBUFFERED"] = "1"
        # A private Flower home: the connection below, and the apps the SuperLink unpacks.
        self.env["FLWR_HOME"] = str(self.workdir)
        (self.workdir / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n',
            encoding="utf-8",
        )
        self.superlink: subprocess.Popen[bytes] | None = None
        self.run_process: subprocess.Popen[str] | None = None
        self.run_id: int | None = None

    # ---------------------------------------------------------------- steps

    def check_traice(self) -> None:
        url = self.args.traice.rstrip("/") + "/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise Failed(
                f"no TRAICE server at {self.args.traice} ({exc}). Start one first: "
                f"traice server --port {self.args.traice.rsplit(':', 1)[-1].strip('/')}; or pass --traice URL"
            ) from None

    def start_superlink(self) -> None:
        if not port_free(self.args.host, self.args.port):
            raise Failed(f"port {self.args.port} on {self.args.host} is in use; pick another with --port")
        command = [
            executable("flower-superlink"),
            "--insecure",
            "--host", self.args.host,
            "--port", str(self.args.port),
            "--disable-runtime-dependency-installation",  # the app runs in this Python; no `uv sync`
        ]
        kept = f" (log: {self.log_path})" if self.args.keep_workdir else ""
        say(f"starting the SuperLink on {self.args.host}:{self.args.port}{kept}")
        with self.log_path.open("wb") as log:
            # Its own session: Ctrl-C reaches this script only, which then stops the SuperLink.
            self.superlink = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        host, port = self.address.rsplit(":", 1)
        while not reachable(host.strip("[]"), int(port)):
            if self.superlink.poll() is not None:
                raise Failed(f"the SuperLink exited with code {self.superlink.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise Failed(f"the SuperLink did not start within 60 s:\n{self.log_tail()}")
            time.sleep(0.3)

    def online_workers(self) -> int | None:
        result = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout_s=60)
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return None
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_workers(self) -> None:
        wanted = self.args.workers
        host = self.args.host if self.args.host not in ("0.0.0.0", "::", "") else "<this machine's address>"
        say(f"waiting for {wanted} worker(s). Start them, each in its own terminal or machine:")
        for node in range(wanted):
            say(f"  python worker.py --node-id {node} --num-workers {wanted} --superlink {host}:{self.args.port}")
        deadline = time.monotonic() + self.args.wait if self.args.wait > 0 else None
        last = -1
        while True:
            self.check_superlink()
            online = self.online_workers()
            if online is not None and online != last:
                say(f"{online}/{wanted} worker(s) online")
                last = online
            if online is not None and online >= wanted:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise Failed(f"only {max(last, 0)} of {wanted} workers came online within {self.args.wait:.0f} s")
            time.sleep(1.0)

    def run_app(self) -> None:
        overrides = " ".join(
            [
                f"num-server-rounds={self.args.rounds}",
                f"min-nodes={self.args.workers}",
                f"traice-server={toml_string(self.args.traice)}",
                f"traice-run={toml_string(self.args.run)}",
                f"country={toml_string(self.args.country.upper())}",
            ]
        )
        command = [executable("flwr"), "run", str(HERE), CONNECTION, "--stream", "--run-config", overrides]
        say(f"submitting the app: {self.args.rounds} round(s) on {self.args.workers} worker(s), "
            f"TRAICE run {self.args.run!r} on {self.args.traice}")
        self.run_process = subprocess.Popen(
            command,
            cwd=HERE,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        assert self.run_process.stdout is not None
        watchdog = threading.Thread(target=self._watch_superlink, daemon=True)
        watchdog.start()
        for line in self.run_process.stdout:  # the ServerApp's log and prints, as they come
            print(line, end="", flush=True)
            if self.run_id is None and (match := RUN_ID.search(line)):
                self.run_id = int(match.group(1))
        code = self.run_process.wait()
        if self.run_id is None:
            raise Failed(f"`flwr run` exited with code {code} before starting a run")
        # `flwr run --stream` exits 0 even when the ServerApp fails, and may return before the
        # run's status is final: ask the SuperLink (flwr ls) until it is.
        status = self.run_status()
        deadline = time.monotonic() + 60
        while not (status or "").startswith("finished") and time.monotonic() < deadline:
            self.check_superlink()
            time.sleep(2.0)
            status = self.run_status()
        if status != "finished:completed":
            raise Failed(f"Flower run {self.run_id} ended as {status!r} (flwr run exit code {code}); see above")

    def run_status(self) -> str | None:
        if self.run_id is None:
            return None
        result = self.flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json", timeout_s=60)
        try:
            runs = json.loads(result.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def summary(self) -> str | None:
        """The run as TRAICE has it, in one line (None if TRAICE cannot say)."""
        try:
            with urllib.request.urlopen(self.args.traice.rstrip("/") + "/api/runs", timeout=10) as response:
                runs = json.loads(response.read())
            run = next(r for r in runs if r["name"] == self.args.run)  # newest first
        except Exception:
            return None
        accuracy = "-" if run.get("accuracy") is None else f"{run['accuracy']:.3f}"
        return (
            f"TRAICE run {run['name']!r} (id {run['id']}, {run['status']}): {run['rounds']} round(s), "
            f"{run['clients']} worker(s), {run['energy_kwh'] * 1000:.3f} Wh, "
            f"{run['emissions_kg'] * 1000:.3f} g CO2e, accuracy {accuracy}"
        )

    # ---------------------------------------------------------------- helpers

    def flwr(self, *arguments: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [executable("flwr"), *arguments],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            start_new_session=True,  # Ctrl-C is ours to handle
        )

    def check_superlink(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise Failed(f"the SuperLink exited with code {self.superlink.returncode}:\n{self.log_tail()}")

    def _watch_superlink(self) -> None:
        """If the SuperLink dies during the run, `flwr run --stream` may wait forever: end it."""
        while self.run_process is not None and self.run_process.poll() is None:
            if self.superlink is not None and self.superlink.poll() is not None:
                say("the SuperLink died during the run")
                self.run_process.terminate()
                return
            time.sleep(1.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def shutdown(self) -> None:
        if self.run_process is not None and self.run_process.poll() is None:
            if self.run_id is not None and self.superlink is not None and self.superlink.poll() is None:
                say(f"stopping Flower run {self.run_id}")
                try:
                    self.flwr("stop", str(self.run_id), CONNECTION, timeout_s=30)
                except subprocess.TimeoutExpired:
                    pass
            stop_group(self.run_process, "flwr run", grace_s=10)
        if self.superlink is not None:
            say("stopping the SuperLink; the workers will stop on their own")
            stop_group(self.superlink, "the SuperLink")
        if self.args.keep_workdir:
            say(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start the TRAICE quickstart's FL server: a Flower SuperLink; once --workers workers "
        "(worker.py) are online, run federated training on them, tracked by TRAICE; then stop.",
        epilog="Example: python server.py --workers 2 --rounds 3 --traice http://127.0.0.1:3000 --run my-exp",
        formatter_class=Help,
    )
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds to train")
    parser.add_argument("--workers", type=int, default=3, help="workers to wait for and train with")
    parser.add_argument("--traice", default="http://127.0.0.1:3000", metavar="URL",
                        help="TRAICE server the ServerApp and every worker report to; it must be reachable "
                        "from the workers' machines")
    parser.add_argument("--run", default=None,
                        help="run name on the TRAICE dashboard (default: quickstart-<date>-<time>)")
    parser.add_argument("--country", default="FRA",
                        help="ISO alpha-3 code of the server's electricity grid; also the workers' default")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the SuperLink listens on; 0.0.0.0 to accept workers from other machines")
    parser.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and Runtime APIs)")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="give up if the workers are not all online after this long (0: wait until Ctrl-C)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary Flower home with the SuperLink's log")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    if args.run is None:
        args.run = f"quickstart-{datetime.now():%Y%m%d-%H%M%S}"
    for option in ("run", "traice", "country"):
        if not NAME.match(getattr(args, option)):
            parser.error(f"--{option} may not contain spaces or quotes: {getattr(args, option)!r}")
    if not args.traice.startswith(("http://", "https://")):
        parser.error(f"--traice must be an http:// or https:// URL, not {args.traice!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT too: a shell that starts this in the background without job control ignores it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    quickstart = Quickstart(args)
    started = time.monotonic()
    try:
        quickstart.check_traice()
        quickstart.start_superlink()
        quickstart.wait_for_workers()
        quickstart.run_app()
        say(f"training done in {time.monotonic() - started:.0f} s")
        line = quickstart.summary()
        say(line or f"TRAICE has no run {args.run!r}: did it refuse the reports? (see the TRAICE lines above)")
        say(f"dashboard: {args.traice}   list the runs: traice runs --server {args.traice}")
        return 0
    except Failed as exc:
        print(f"[server] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, Interrupted):
        say("interrupted")
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        quickstart.shutdown()


if __name__ == "__main__":
    sys.exit(main())
