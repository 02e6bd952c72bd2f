"""Masking of secrets (passwords, keys) in connection strings, values and error text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["looks_secret", "mask_conninfo", "mask_message", "mask_value"]

# libpq keywords whose values are secrets, in conninfo strings and in connect kwargs.
SECRET_KEYS: Final = frozenset(
    {"password", "sslpassword", "scram_client_key", "scram_server_key", "oauth_client_secret"}
)
_SECRET_WORD: Final = r"(?:ssl)?password|scram_(?:client|server)_key|oauth_client_secret"
_SECRET_PATTERNS: Final = (
    # URL userinfo. libpq ends the password at the first "@", but mask up to the last one so
    # that an unencoded "@" or "/" in a password never leaks (at worst the host is hidden).
    re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'"]*:([^\s'"]+)@"""),
    # ... and a password with unencoded spaces, which libpq rejects but a user may well paste.
    re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'"]*:([^/@'"\n]+)@"""),
    re.compile(rf"""[?&](?:{_SECRET_WORD})=([^&#\s'"]+)""", re.IGNORECASE),
    # key=value: a quoted value (maybe unterminated) or an unquoted one with backslash escapes.
    re.compile(
        rf"""(?<![\w.?&-])(?:{_SECRET_WORD})\s*=\s*('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])+)""",
        re.IGNORECASE,
    ),
)


def _secret_spans(s: str) -> list[tuple[int, int]]:
    spans = sorted(m.span(1) for rx in _SECRET_PATTERNS for m in rx.finditer(s))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def mask_conninfo(s: str) -> str:
    """Return `s` with every password in it (URL or key=value form) replaced by ``***``.

    Works on malformed strings and on log text containing a connection string; never raises.
    """
    try:
        text = s if isinstance(s, str) else str(s)
        parts, pos = [], 0
        for start, end in _secret_spans(text):
            parts += [text[pos:start], "***"]
            pos = end
        parts.append(text[pos:])
        return "".join(parts)
    except Exception:
        return "<connection string hidden>"


def mask_message(message: str, conninfo: str) -> str:
    """Mask a libpq parse error, which quotes fragments of the (secret-bearing) input."""
    spans = _secret_spans(conninfo)

    def hide(m: re.Match[str]) -> str:
        token = m.group(1)
        if (masked := mask_conninfo(token)) != token:
            return f'"{masked}"'
        start = conninfo.find(token)
        while start != -1 and token:
            if any(start < e and s < start + len(token) for s, e in spans):
                return '"***"'
            start = conninfo.find(token, start + 1)
        return f'"{token}"'

    return re.sub(r'"([^"]*)"', hide, mask_conninfo(message.strip()))


def mask_value(value: object) -> object:
    """`value` as it may appear in an error or repr: passwords replaced by ``***``."""
    if isinstance(value, str | bytes):
        return mask_conninfo(value.decode(errors="replace") if isinstance(value, bytes) else value)
    if isinstance(value, Mapping):
        return {k: "***" if looks_secret(k) else mask_value(v) for k, v in value.items()}
    return value


def looks_secret(key: object) -> bool:
    """Whether a setting, argument or variable named `key` probably holds a secret."""
    return isinstance(key, str) and (
        key in SECRET_KEYS or any(w in key.lower() for w in ("pass", "secret", "token"))
    )
