"""In-process TCP proxy that cuts, black-holes and slows down links to PostgreSQL in tests."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["TcpProxy"]

# Every join and connect is bounded so a misbehaving test cannot hang teardown.
JOIN_TIMEOUT = 5.0
ACCEPT_POLL = 0.5
CHUNK = 65536
# SO_LINGER with a zero timeout makes close() send RST instead of FIN: a hard cut.
_LINGER_RESET = struct.pack("ii", 1, 0)


class TcpProxy:
    """Relay 127.0.0.1:``port`` to ``target_host:target_port`` with faults on demand.

    ``stop()`` refuses new connections and cuts every relayed one, ``start()`` listens again
    on the same port, ``deaf(True)`` accepts but forwards nothing (a network partition:
    bytes wait and flow again after ``deaf(False)``), ``delay(s)`` holds every chunk.
    The proxy listens as soon as it is created; ``close()`` it when done.
    """

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, *, connect_timeout: float = 5.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.port = 0
        self.accepted = 0  # connections accepted since creation, deaf ones included
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._relays: set[_Relay] = set()
        self._deaf = False
        self._delay = 0.0
        self._closed = False
        self.start()

    def __repr__(self) -> str:
        state = "listening" if self._listener else "stopped"
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
            f"{state} active={self.active} accepted={self.accepted}>"
        )

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Connections currently relayed (or held while deaf)."""
        with self._cond:
            return len(self._relays)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen again (on the same port after the first time); no-op when listening."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
                # Polling accept() bounds the acceptor's exit even where shutdown() of a
                # listening socket does not wake it (it does on Linux).
                listener.settimeout(ACCEPT_POLL)
            except OSError:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._acceptor = threading.Thread(
                target=self._accept_loop, args=(listener,), daemon=True,
                name=f"proxy-accept-{self.port}",
            )  # fmt: skip
            self._acceptor.start()

    def stop(self) -> None:
        """Stop listening (new connects are refused) and cut every relayed connection."""
        with self._cond:
            listener, acceptor = self._listener, self._acceptor
            self._listener = self._acceptor = None
            relays = list(self._relays)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            if acceptor is not None:
                acceptor.join(JOIN_TIMEOUT)
            listener.close()
        for relay in relays:
            relay.cut()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for relay in relays:
            relay.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop for good; idempotent."""
        with self._cond:
            self._closed = True
        self.stop()

    def deaf(self, enabled: bool = True) -> None:
        """Black-hole mode: accept connections but forward nothing, in either direction."""
        with self._cond:
            self._deaf = enabled
            self._cond.notify_all()

    def delay(self, seconds: float) -> None:
        """Hold every forwarded chunk for ``seconds`` (0 to turn off)."""
        if seconds < 0:
            raise ValueError(f"seconds={seconds!r} must be >= 0")
        self._delay = float(seconds)

    def dsn_for(self, dsn: str) -> str:
        """Rewrite a URL or key=value conninfo so it connects through this proxy."""
        if dsn.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(dsn)
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = (
                f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
            )
            query = [
                (k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "hostaddr", "port")
            ]
            return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
        params = conninfo_to_dict(dsn)
        params.pop("hostaddr", None)
        params.update(host=self.host, port=str(self.port))
        return make_conninfo("", **params)

    # -- internals ---------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                if self._listener is not listener:
                    return
                continue
            except OSError:
                return  # listener shut down by stop()
            client.settimeout(None)
            with self._cond:
                if self._listener is not listener:
                    _abort(client)
                    client.close()
                    return
                self.accepted += 1
                relay = _Relay(self, client)
                self._relays.add(relay)
            relay.start()

    def _wait_audible(self, relay: _Relay) -> bool:
        """Block while deaf; False when the relay was cut meanwhile."""
        with self._cond:
            self._cond.wait_for(lambda: not self._deaf or relay.is_cut)
            return not relay.is_cut

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _forget(self, relay: _Relay) -> None:
        with self._cond:
            self._relays.discard(relay)


def _abort(sock: socket.socket) -> None:
    """Make the peer see a reset and wake any thread blocked on ``sock``."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Relay:
    """One client connection: a thread per direction; the last one out closes both sockets."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._alive = 0

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def start(self) -> None:
        self._spawn(self._connect_and_pump, f"proxy-{self.proxy.port}-up")

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            # Sockets are closed only once no thread uses them, so shutdown is safe here.
            for sock in (self.client, self.server):
                if sock is not None and sock.fileno() != -1:
                    _abort(sock)
        self.proxy._wake()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True, name=name)
        with self._lock:
            self._alive += 1
            self._threads.append(thread)
        thread.start()

    def _run(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
                if last:
                    self.client.close()
                    if self.server is not None:
                        self.server.close()
            if last:
                self.proxy._forget(self)

    def _connect_and_pump(self) -> None:
        if not self.proxy._wait_audible(self):
            return
        try:
            server = socket.create_connection(
                (self.proxy.target_host, self.proxy.target_port),
                timeout=self.proxy.connect_timeout,
            )
        except OSError:
            self.cut()  # target down: the client sees a reset, like a dead server
            return
        server.settimeout(None)
        with self._lock:
            if self.is_cut:
                server.close()
                return
            self.server = server
        self._spawn(self._pump, f"proxy-{self.proxy.port}-down", server, self.client)
        self._pump(self.client, server)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                self.cut()
                return
            if not data:
                # Orderly close: pass the half-close on and let the other direction finish.
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if not self.proxy._wait_audible(self):
                return
            delay = self.proxy._delay
            if delay and self._cut.wait(delay):
                return
            try:
                dst.sendall(data)
            except OSError:
                self.cut()
                return
