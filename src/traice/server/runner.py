"""Running the server: ``serve`` for the CLI, ``ServerThread`` for the demo and tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..protocol import MAX_FRAME_BYTES


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    limits = getattr(app.state, "limits", None)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws="websockets-sansio",
        # larger frames close the socket with 1009
        ws_max_size=limits.max_frame_bytes if limits is not None else MAX_FRAME_BYTES,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        lifespan="on",
    )


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 3000, log_level: str = "info") -> None:
    """Serve until interrupted."""
    uvicorn.Server(_config(app, host, port, log_level)).run()


class ServerThread:
    """A real server on a real port, in a background thread. ``port=0`` picks a free one."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(_config(app, host, self.port, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("TRAICE server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
