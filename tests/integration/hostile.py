"""A hostile HTTP server on 127.0.0.1: endless, huge, trickling and compressed answers.

It speaks just enough HTTP/1.1 over raw sockets to misbehave in ways a framework would not
allow: the behaviour is chosen by a word in the request path (``/endless``, ``/huge``,
``/trickle``...), so any client path can be aimed at it (``/v1/billing/wallets/endless/balance``).
Every connection runs in its own thread and stops when the client goes away.
"""

from __future__ import annotations

import functools
import gzip
import socket
import threading
import time
from types import TracebackType

CHUNK = b"x" * 65536
HUGE = 300 * 1024 * 1024


@functools.cache
def gzip_bomb() -> bytes:
    """64 MB of spaces in about 64 KB of gzip (built once, before any measurement)."""
    return gzip.compress(b" " * (64 * 1024 * 1024))


class HostileServer:
    def __init__(self, *, trickle_every: float = 0.2, host: str = "127.0.0.1") -> None:
        self.trickle_every = trickle_every
        self.requests: list[str] = []
        self.closed_early = 0
        """Connections whose client hung up before the answer was complete."""
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._bomb = gzip_bomb()
        self._host = host
        self._sock = socket.create_server((host, 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._sock.getsockname()[1]}"

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return ""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head.split(b"\r\n", 1)[0].decode("latin-1")

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self._lock:
            self.bytes_sent += len(data)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = self._read_request(conn)
                if not line:
                    return
                with self._lock:
                    self.requests.append(line)
                self._answer(conn, line.split(" ")[1] if " " in line else "/")
            except (BrokenPipeError, ConnectionResetError, OSError):
                with self._lock:
                    self.closed_early += 1

    def _answer(self, conn: socket.socket, path: str) -> None:
        json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if path.split("?")[0].endswith("/transactions"):  # a well-behaved empty ledger page
            body = b'{"transactions": []}'
            self._send(conn, json_head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif "endless" in path:  # chunked, never ends
            self._send(conn, json_head + b"Transfer-Encoding: chunked\r\n\r\n")
            frame = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
            while not self._stop.is_set():
                self._send(conn, frame)
        elif "huge-declared" in path:  # honest Content-Length of 300 MB
            self._send(conn, json_head + b"Content-Length: %d\r\n\r\n" % HUGE)
            self._stream(conn, HUGE)
        elif "huge" in path:  # 300 MB, length unknown until the connection closes
            self._send(conn, json_head + b"Connection: close\r\n\r\n")
            self._stream(conn, HUGE)
        elif "trickle-head" in path:  # the status line and headers one byte at a time
            for byte in json_head + b"Content-Length: 2\r\n\r\n{}":
                self._send(conn, bytes([byte]))
                time.sleep(self.trickle_every)
        elif "trickle" in path:  # headers at once, then one body byte at a time
            body = b'{"balance": "1.00"' + b" " * 10_000 + b"}"
            self._send(conn, json_head + b"Content-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                if self._stop.is_set():
                    return
                self._send(conn, bytes([byte]))
                time.sleep(self.trickle_every)
        elif "gzip" in path:  # compressed although identity was asked for: 64 MB from 64 KB
            bomb = self._bomb
            self._send(
                conn,
                json_head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb,
            )
        else:  # a well-behaved small answer
            body = b'{"balance": "12.50"}'
            self._send(conn, json_head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def _stream(self, conn: socket.socket, total: int) -> None:
        sent = 0
        while sent < total and not self._stop.is_set():
            self._send(conn, CHUNK)
            sent += len(CHUNK)
