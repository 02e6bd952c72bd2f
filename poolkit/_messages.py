"""Message builders and connect-error classification: every stall and failure explained."""

from __future__ import annotations

import re

from ._config import mask_conninfo

# Connect errors that waiting cannot fix; each with the setting to change. libpq reports
# them as text (psycopg gives no SQLSTATE for a failed connection), hence the patterns.
_PERMANENT: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.I), fix)
    for p, fix in (
        (r"password authentication failed", "check the user and password in conninfo/kwargs"),
        (r"database \"[^\"]*\" does not exist", "check dbname in conninfo (or create it)"),
        (r"role \"[^\"]*\" does not exist", "check the user name in conninfo"),
        (r"is not permitted to log in", "grant LOGIN to the role, or use another user"),
        (r"no pg_hba\.conf entry", "allow this client in the server's pg_hba.conf"),
        (r"permission denied for database", "GRANT CONNECT on the database to the user"),
        (
            r"failed to resolve host|could not translate host name",
            "check the host name in conninfo",
        ),
        (r"invalid \w+ value|invalid connection option|invalid URI", "fix the conninfo"),
        (
            r"server does not support SSL|SSL error|certificate|sslmode",
            "check sslmode and the TLS settings (sslrootcert, sslcert, sslkey)",
        ),
    )
)


def permanent_fix(error: BaseException) -> str | None:
    """The fix for a connect error that retrying cannot cure, or None if it may be transient."""
    text = str(error)
    for pattern, fix in _PERMANENT:
        if pattern.search(text):
            return fix
    return None


def describe_error(error: BaseException) -> str:
    """One line for logs and messages: the server's reason, masked, without libpq's noise."""
    text = " ".join(str(error).split())
    text = re.sub(r"^connection failed: ", "", text)
    # libpq prefixes the server's reason with the address (a TCP host or a unix socket),
    # which messages give anyway.
    text = re.sub(
        r'^connection to server (at "[^"]*"(, port \d+)?|on socket "[^"]*") failed: ', "", text
    )
    return mask_conninfo(text or type(error).__name__)


def state_line(
    size: int, min_size: int, max_size: int, idle: int, in_use: int, waiting: int
) -> str:
    return (
        f"size={size} (min {min_size}, max {max_size}), idle={idle}, in_use={in_use}, "
        f"waiting={waiting}"
    )
