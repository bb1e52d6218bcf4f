#!/usr/bin/env python3
"""Start one TRAICE quickstart worker: a Flower SuperNode that connects to the SuperLink.

    python worker.py --node-id 0                                  # on the SuperLink's machine
    python worker.py --node-id 1 --superlink 10.0.0.5:9092        # on another machine

The worker trains partition ``--node-id`` of the data whenever the server's app asks it to,
and reports its energy to TRAICE as ``worker-<node-id>``. It runs until the SuperLink goes
away (``server.py`` stops it at the end of training) or Ctrl-C.

The file is self-contained: to run a worker elsewhere, copy it there and install
``traice[demo]`` (Flower, PyTorch, scikit-learn) in the Python that runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SUPERLINK = "127.0.0.1:9092"
NAME = re.compile(r"^[A-Za-z0-9_.:@/-]+$")  # goes into --node-config: no spaces or quotes


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def say(text: str) -> None:
    print(f"[worker] {text}", flush=True)


def fail(text: str, code: int = 2) -> int:
    print(f"[worker] error: {text}", file=sys.stderr, flush=True)
    return code


def executable(name: str) -> str | None:
    """``name`` next to this Python first (a venv that is not activated), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--superlink must be HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def toml_string(value: str) -> str:
    return '"' + value + '"'


def descendants(pid: int) -> list[object]:
    try:
        import psutil  # installed with traice (codecarbon needs it)

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:
        return []


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the SuperNode's process group (its SuperExec, running ClientApps), then SIGKILL."""
    if process.poll() is None:
        children = descendants(process.pid)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            say("the SuperNode did not stop in time; killing it")
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        process.wait()
        for child in children:  # in case one left the group
            try:
                child.wait(5)  # type: ignore[attr-defined]
            except Exception:
                try:
                    child.kill()  # type: ignore[attr-defined]
                except Exception:
                    pass


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start a TRAICE quickstart worker: a Flower SuperNode that trains one partition of the data "
        "and reports its energy and emissions to TRAICE. Runs until the SuperLink goes away or Ctrl-C.",
        epilog="Example: python worker.py --node-id 1 --superlink 10.0.0.5:9092 --country DEU",
        formatter_class=Help,
    )
    parser.add_argument("--node-id", type=int, required=True, help="this worker's number, 0, 1, 2 ...; "
                        "selects its share of the data")
    parser.add_argument("--superlink", default=DEFAULT_SUPERLINK,
                        help="HOST:PORT of the SuperLink started by server.py")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="number of data partitions, the same on every worker (default: the server's --workers)")
    parser.add_argument("--country", default=None,
                        help="ISO alpha-3 code of this worker's electricity grid, e.g. FRA, DEU, USA "
                        "(default: the server's country)")
    parser.add_argument("--name", default=None, help="name of this worker on the dashboard (default: worker-<node-id>)")
    parser.add_argument("--traice", default=None, metavar="URL",
                        help="report to this TRAICE server instead of the one the server's app names "
                        "(useful when it has another address from this machine)")
    parser.add_argument("--runtime-port", type=int, default=None,
                        help="local port of the SuperNode's runtime API, distinct per worker on a machine "
                        "(default: 9094 + node-id)")
    parser.add_argument("--linger", type=float, default=15.0, metavar="SECONDS",
                        help="stop once the SuperLink has been unreachable this long")
    args = parser.parse_args(argv)
    if args.node_id < 0:
        parser.error("--node-id must be 0 or more")
    if args.num_workers is not None and not 0 <= args.node_id < args.num_workers:
        parser.error(f"--node-id must be below --num-workers ({args.num_workers})")
    if args.runtime_port is None:
        args.runtime_port = 9094 + args.node_id
    if args.name is None:
        args.name = f"worker-{args.node_id}"
    for option in ("name", "country", "traice"):
        value = getattr(args, option)
        if value is not None and not NAME.match(value):
            parser.error(f"--{option} may not contain spaces or quotes: {value!r}")
    try:
        split_address(args.superlink)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def node_config(args: argparse.Namespace) -> str:
    pairs = [f"partition-id={args.node_id}", f"traice-node-id={toml_string(args.name)}"]
    if args.num_workers is not None:
        pairs.append(f"num-partitions={args.num_workers}")
    if args.country:
        pairs.append(f"traice-country={toml_string(args.country.upper())}")
    if args.traice:
        pairs.append(f"traice-server={toml_string(args.traice)}")
    return " ".join(pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    supernode = executable("flower-supernode")
    if supernode is None:
        return fail("flower-supernode not found: install Flower, e.g. pip install 'traice[demo]'")
    if not port_free(args.runtime_port):
        return fail(
            f"port {args.runtime_port} on 127.0.0.1 is in use (another worker with --node-id {args.node_id}?); "
            "pick another with --runtime-port"
        )
    host, port = split_address(args.superlink)

    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flower-superexec, flwr-clientapp
    env["PYTHONUNBUFFERED"] = "1"
    home = tempfile.mkdtemp(prefix=f"traice-worker-{args.node_id}-")
    env["FLWR_HOME"] = home  # where this SuperNode unpacks the app; private, removed at the end

    command = [
        supernode,
        "--insecure",
        "--superlink", args.superlink,
        "--port", str(args.runtime_port),
        "--node-config", node_config(args),
    ]
    # SIGINT too: a shell that starts this in the background without job control ignores it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)

    process: subprocess.Popen[bytes] | None = None
    try:
        say(f"{args.name}: SuperNode for partition {args.node_id}, SuperLink {args.superlink}")
        # Its own session: Ctrl-C reaches this script only, which then stops the whole group.
        process = subprocess.Popen(command, env=env, start_new_session=True)
        seen = False
        last_ok = time.monotonic()
        next_hint = time.monotonic() + 10
        while True:
            code = process.poll()
            if code is not None:
                if code:
                    say(f"the SuperNode exited with code {code}")
                return code if code >= 0 else 128 - code
            now = time.monotonic()
            if reachable(host, port):
                if not seen:
                    say(f"SuperLink at {args.superlink} is up; waiting for work")
                seen, last_ok = True, now
            elif seen and now - last_ok > args.linger:
                say(f"the SuperLink at {args.superlink} has gone away; stopping")
                return 0
            elif not seen and now > next_hint:
                say(f"waiting for the SuperLink at {args.superlink} (start server.py) ...")
                next_hint = now + 30
            time.sleep(1.0)
    except (KeyboardInterrupt, Interrupted):
        say("interrupted; stopping")
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        if process is not None:
            stop_group(process)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
