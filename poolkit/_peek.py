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

    def quiet(self, conn: Any) -> bool:
        """True if the idle connection's socket has nothing to say (the usual case)."""
        return self._poll is None or not self._poll.poll(0)

    def broken(self, conn: Any) -> bool | None:
        """After `quiet()` said no: True if the socket shows a hang-up or the connection
        went bad; None if it is readable but still looks fine (a NOTIFY, a notice, or the
        first half of the server's goodbye: FATAL, then EOF, may arrive in two reads):
        the caller should make a round trip to know."""
        poll = self._poll
        if poll is None:
            return False
        events = poll.poll(0)
        if not events:
            return False
        if events[0][1] & _HANGUP:
            return True
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
            events = poll.poll(0)
            if events and events[0][1] & _HANGUP:
                return True
        except Exception:
            return True
        return True if pgconn.status != 0 else None  # 0 == CONNECTION_OK


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
