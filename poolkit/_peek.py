"""The non-blocking liveness peek at an idle connection's socket."""

from __future__ import annotations

import contextlib
import os
import select
import socket
from typing import Any

_RDHUP = getattr(select, "POLLRDHUP", 0)
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP
# Idle connections back for less than this are lent without the peek: a connection
# returned a millisecond ago has had no time to be dropped, and the peek is a syscall.
PEEK_AFTER = 0.001


class Peeker:
    """Polls one connection's socket without blocking: an idle socket has nothing to say."""

    __slots__ = ("_poll",)

    def __init__(self, conn: Any) -> None:
        self._poll: Any = None
        try:
            poll = select.poll()
            poll.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI | _RDHUP)
            self._poll = poll
        except Exception:  # no socket to watch: the peek always says "fine"
            self._poll = None

    def broken(self, conn: Any) -> bool:
        """True if the idle connection's socket shows a hang-up or the server's goodbye."""
        poll = self._poll
        if poll is None:
            return False
        events = poll.poll(0)
        if not events:
            return False
        if events[0][1] & _HANGUP:
            return True
        # Readable while idle: a NOTIFY or a notice, or the server's goodbye (FATAL,
        # then EOF), which may arrive in two reads.
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
            events = poll.poll(0)
            if events and events[0][1] & _HANGUP:
                return True
            if events:
                pgconn.consume_input()
        except Exception:
            return True
        return bool(pgconn.status != 0)  # 0 == CONNECTION_OK


def cut(conn: Any) -> None:
    """Shut the connection's socket down, waking any thread or task blocked on it.

    For I/O that overran its deadline on an unresponsive network: psycopg then sees the
    connection as broken and raises in whoever was waiting.
    """
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
