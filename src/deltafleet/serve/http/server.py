"""Run the app under uvicorn with a graceful drain: the CLI (main thread, signals) and tests (a thread).

Shutdown sequence (first SIGINT/SIGTERM, or `BackgroundServer.stop`):
1. the gateway refuses new generation requests (HTTP 503) and /health reports "draining";
2. running requests get `deadline` seconds to finish; the rest are aborted (their clients get an error);
3. uvicorn closes the listening socket and the idle connections and exits.
A second Ctrl-C during the drain exits at once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from types import FrameType

import uvicorn

from deltafleet.serve.http.gateway import Gateway


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, deadline: float):
        super().__init__(config)
        self.gateway = gateway
        self.deadline = deadline
        self._drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_thread is not None:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.drain()

    def drain(self) -> threading.Thread:
        """Start the drain sequence (non-blocking); returns the thread doing it."""
        if self._drain_thread is None:
            self.gateway.begin_shutdown()
            self._drain_thread = threading.Thread(target=self._drain, name="deltafleet-drain", daemon=True)
            self._drain_thread.start()
        return self._drain_thread

    def _drain(self) -> None:
        try:
            self.gateway.shutdown(self.deadline)
        finally:
            self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: an ephemeral one), so the port is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, gateway: Gateway, deadline: float = 30.0, log_level: str = "warning",
                access_log: bool = False) -> DrainingServer:
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="off",
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    return DrainingServer(config, gateway, deadline)


class BackgroundServer:
    """The server on a background thread, listening on host:port (0 = ephemeral). For tests and benchmarks."""

    def __init__(self, app, gateway: Gateway, host: str = "127.0.0.1", port: int = 0, deadline: float = 30.0):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, gateway, deadline)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="deltafleet-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Drain (running requests get the deadline) and wait for the server thread to end."""
        self.server.drain()
        self.thread.join(timeout)
