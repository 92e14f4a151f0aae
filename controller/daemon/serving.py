"""A stdlib HTTP server on its own thread, for the daemon's small listeners (``/metrics`` and
the probes, the plan API): they answer while a pass keeps the event loop busy."""

from __future__ import annotations

import threading
from http.server import HTTPServer
from typing import Self


class ThreadedServer:
    """Start, stop and the URL of ``server`` served by one daemon thread."""

    scheme = "http"

    def __init__(self, server: HTTPServer, host: str, *, name: str) -> None:
        self._server = server
        self.host = host
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
