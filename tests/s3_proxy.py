"""A TCP proxy in front of a real S3 server that can hold one request: the first whose
request line matches a pattern (say `PUT /bucket/….versions.json`) is not passed on until the
test releases it. A build is then frozen in exactly that write, and the test kills what it
likes (the build, the S3 server, a dask worker) at that moment.

Bytes pass through unchanged (S3 signatures name the Host the client used, which is this
proxy, and the server does not check it against its own port). Once the upstream server is
gone, connections are cut at once, as a dead server's would be refused.
"""

from __future__ import annotations

import re
import socket
import threading
from contextlib import suppress


class HoldingProxy:
    """Listens on 127.0.0.1 (`port`) and forwards every connection to `upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pattern: re.Pattern[bytes] | None = None
        self._release = threading.Event()
        self._forward = True
        self.held = threading.Event()  # set once a matching request is being held
        self.held_request = ""
        self.held_client_port = 0  # the client's port of the held connection (find its pid)
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, path_pattern: str, method: str = "PUT") -> None:
        """Hold the next request `method` whose path matches `path_pattern` (a regex)."""
        with self._lock:
            self._release = threading.Event()
            self.held.clear()
            self._pattern = re.compile(rf"{method} ({path_pattern}) HTTP/1\.1\r\n".encode())

    def release(self, *, forward: bool = True) -> None:
        """Pass the held request on, or (`forward=False`) drop it and cut its connection, as
        if the kill came before its bytes reached the server; hold nothing more."""
        with self._lock:
            self._pattern = None
            self._forward = forward
            self._release.set()

    def refuse(self) -> None:
        """Stop listening: new connections are refused, as by a server that is gone."""
        self._listener.close()

    def listen(self) -> None:
        """Listen again, on the same port (the server is back)."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.release()
        self._listener.close()

    def _accept(self) -> None:
        listener = self._listener
        while True:
            try:
                client, address = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, address[1]), daemon=True).start()

    def _serve(self, client: socket.socket, client_port: int) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:  # the server is down: cut the client off, as a refused connection
            _abort(client)
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        tail = b""
        try:
            while data := client.recv(65536):
                with self._lock:
                    pattern, release = self._pattern, self._release
                if pattern is not None and not self.held.is_set():
                    found = pattern.search(tail + data)
                    if found:
                        self.held_request = found.group(0).decode().strip()
                        self.held_client_port = client_port
                        self.held.set()
                        release.wait()
                        if not self._forward:
                            return
                tail = data[-512:]
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _abort(client)
            _abort(upstream)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _abort(sink)
            _abort(source)


def _abort(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()
