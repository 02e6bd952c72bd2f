"""Exceptions raised by poolkit, plus psycopg_pool's own, re-exported unchanged."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from psycopg import InterfaceError
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


class _NotSet(enum.Enum):
    NOT_SET = "not set"

    def __repr__(self) -> str:
        return "<not set>"


class ConfigError(PoolkitError, ValueError):
    """One or more settings have a wrong type or value, or are missing.

    ``setting`` names what the user wrote (a field, an environment variable or a
    ``DATABASES`` key), ``value`` is what they gave (with any password masked;
    `ConfigError.NOT_SET` when it is missing), ``problem`` says what is wrong and ``fix``
    what to change. Every problem found is reported at once: ``problems`` lists one
    ConfigError per problem, and the fields above are those of the first.
    """

    __module__ = "poolkit"
    NOT_SET: ClassVar[_NotSet] = _NotSet.NOT_SET

    def __init__(
        self, setting: str, value: object, problem: str, fix: str, *, note: str = ""
    ) -> None:
        self.setting = setting
        self.value = value
        self.problem = problem
        self.fix = fix
        self.note = note  # shown after the value, e.g. "the default"
        self.problems: list[ConfigError] = [self]
        super().__init__(self._line())

    def _line(self) -> str:
        if self.value is _NotSet.NOT_SET:
            head = f"{self.setting} is not set"
        else:
            head = f"{self.setting}={self.value!r}"
        if self.note:
            head += f" ({self.note})"
        return f"{head}: {self.problem}; {self.fix}"

    @classmethod
    def _of(cls, problems: Sequence[ConfigError]) -> ConfigError:
        """One error reporting every problem in `problems` (flattened), in order."""
        flat = [p for err in problems for p in err.problems]
        if len(flat) == 1:
            return flat[0]
        first = flat[0]
        err = cls(first.setting, first.value, first.problem, first.fix, note=first.note)
        err.problems = flat
        lines = "".join(f"\n  - {p._line()}" for p in flat)
        err.args = (f"{len(flat)} problems with the pool settings:{lines}",)
        return err

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call ConfigError(message) and fail on unpickling.
        others = None if self.problems == [self] else self.problems
        fields = (self.setting, self.value, self.problem, self.fix, self.note)
        return (_rebuild, (type(self), fields, others))

    def _renamed(self, setting: str) -> ConfigError:
        """The same error, its first problem reported under the name the user wrote."""
        first, *rest = self.problems
        return type(self)._of([first._as(setting), *rest])

    def _rename_each(self, rename: Callable[[str], str]) -> ConfigError:
        """The same error, every problem's setting passed through `rename`."""
        return type(self)._of([p._as(rename(p.setting)) for p in self.problems])

    def _as(self, setting: str, *, given: bool = False) -> ConfigError:
        """This one problem under another name; `given`: the user set it, so not a default."""
        note = "" if given and self.note == "the default" else self.note
        return type(self)(setting, self.value, self.problem, self.fix, note=note)


def _rebuild(
    cls: type[ConfigError], fields: tuple[Any, ...], others: list[ConfigError] | None
) -> ConfigError:
    setting, value, problem, fix, note = fields
    if others is None:
        return cls(setting, value, problem, fix, note=note)
    return cls._of(others)


class ConnectionReturned(PoolkitError, InterfaceError):
    """A connection was used after it went back to its pool.

    Raised before anything reaches the server: the statement is not sent, and the
    connection (which may already belong to another borrower) is untouched.
    """

    __module__ = "poolkit"


class ConnectFailed(PoolkitError, PoolTimeout):
    """The pool cannot connect for a reason that waiting will not fix.

    A PoolTimeout (so code written for psycopg_pool's `wait()` catches it), raised at once
    instead of after the timeout.

    Wrong password, unknown role or database, a host name that does not resolve, a bad
    TLS setting: the message starts with the server's reason, then the setting to change.
    The pool keeps retrying in the background (a rotated password may come back).
    """

    __module__ = "poolkit"
