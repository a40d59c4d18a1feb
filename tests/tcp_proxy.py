"""A TCP proxy the fault tests put in front of PostgreSQL or Redis, and cut.

The machine's services are shared: a test never stops them. It points the app at this proxy
instead, and `cut()` plays the outage: open connections are reset (as a crashed server's are)
and new ones are refused (nothing listens on the port), until `restore()` listens again on the
same port.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forward 127.0.0.1:<port> to (host, port); `cut` and `restore` it at will."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._accepting: threading.Thread | None = None
        #: Connections accepted since the start, and how many `cut` reset.
        self.accepted = 0
        self.reset = 0
        #: While set, new connections are accepted and then hear nothing (a host that vanished
        #: without a reset: packets dropped by a firewall, a network partition).
        self._silent = False
        self._held: list[socket.socket] = []

    @classmethod
    def for_url(cls, url: str) -> "TcpProxy":
        """A proxy to the host and port of a database or Redis URL."""
        parts = urlsplit(url)
        default = 6379 if parts.scheme.startswith("redis") else 5432
        return cls(parts.hostname or "127.0.0.1", parts.port or default)

    def url_through(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's (user, password, path kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> "TcpProxy":
        self._listen()
        return self

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
            self._accepting = None
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            self.reset += 1
            for sock in pair:
                _reset(sock)

    def go_silent(self) -> None:
        """Accept new connections but forward nothing on them, answering nothing, until `restore`."""
        self._silent = True

    def restore(self) -> None:
        """Listen again, on the same port (and forward again after `go_silent`)."""
        self._silent = False
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)
        if self._listener is None:
            self._listen()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.05)  # so the accept loop notices a cut
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                           name=f"tcp-proxy-{self.port}")
        self._accepting.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            if self._silent:
                with self._lock:
                    self._held.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _reset(client), _reset(upstream)
                    return
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        peers = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                with self._lock:
                    if pair not in self._pairs:
                        return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            for sock in pair:
                _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0), as a crashed server's connections end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
