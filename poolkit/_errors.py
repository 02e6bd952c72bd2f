"""Exceptions raised by poolkit, plus psycopg_pool's own, re-exported unchanged."""

from __future__ import annotations

from typing import Any

from psycopg import InterfaceError, OperationalError
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

__all__ = [
    "ConfigError",
    "ConnectFailed",
    "ConnectionReturned",
    "PoolClosed",
    "PoolTimeout",
    "PoolkitError",
    "TooManyRequests",
]


class PoolkitError(Exception):
    """Base class of the errors poolkit adds; psycopg_pool's own errors are not subclasses."""

    __module__ = "poolkit"


class ConfigError(PoolkitError, ValueError):
    """A setting has a wrong type or value.

    ``setting`` names what the user wrote (a field, an environment variable or a
    ``DATABASES`` key), ``value`` is what they gave (with any password masked) and
    ``fix`` says what to change.
    """

    __module__ = "poolkit"

    def __init__(self, setting: str, value: object, problem: str, fix: str) -> None:
        self.setting = setting
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{setting}={value!r}: {problem}; {fix}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call ConfigError(message) and fail on unpickling.
        return (type(self), (self.setting, self.value, self.problem, self.fix))

    def _renamed(self, setting: str) -> ConfigError:
        """The same error reported under the name the user wrote (env var, dict key)."""
        return type(self)(setting, self.value, self.problem, self.fix)


class ConnectionReturned(PoolkitError, InterfaceError):
    """A connection was used after it went back to its pool.

    Raised before anything reaches the server: the statement is not sent, and the
    connection (which may already belong to another borrower) is untouched.
    """

    __module__ = "poolkit"


class ConnectFailed(PoolkitError, OperationalError):
    """The pool cannot connect for a reason that waiting will not fix.

    Wrong password, unknown role or database, a host name that does not resolve, a bad
    TLS setting: the message starts with the server's reason, then the setting to change.
    The pool keeps retrying in the background (a rotated password may come back).
    """

    __module__ = "poolkit"
