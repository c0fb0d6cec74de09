"""Keeping tokens and secrets out of log lines: `redact`, the `RedactSecrets` filter, and `install`.

uvicorn logs every WebSocket it accepts through ``uvicorn.error`` with its whole URL
(``"WebSocket /ws?token=eyJ..." [accepted]``), whatever ``access_log`` says, and any library may
log a header or a URL. So the gateway puts one filter on the root logger, on uvicorn's loggers and
on every handler configured when it starts (a filter on a handler sees the records of every logger
that propagates to it; one on a logger only that logger's own), and the filter rewrites a record
whose text holds a ``token=``/``secret=``-style query value, an ``Authorization: Bearer`` value
or anything shaped like a JWT.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # a query or form value: ?token=..., &access_token=..., password=...
    (re.compile(r"(?i)\b((?:access_|refresh_|id_)?token|jwt|secret|password|api_key)=[^&\s\"'#;,]+"),
     rf"\1={REDACTED}"),
    # Authorization: Bearer ..., and the subprotocol form "bearer, <token>"
    (re.compile(r"(?i)\b(bearer[\s,]+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1{REDACTED}"),
    # a JWT anywhere (header.payload.signature, the header base64url JSON: "eyJ")
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
)
# uvicorn's loggers, the websockets library's, and the root one (which basicConfig and most apps use)
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets")


def redact(text: str) -> str:
    """``text`` with every token-like value replaced by ``[redacted]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and its formatted traceback) with `redact`; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format/args pair: logging reports it when the record is formatted
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install() -> RedactSecrets:
    """Put the filter on `LOGGERS` and on every handler of every logger configured now (idempotent:
    call it again after the logging configuration changes, as the gateway does when it starts)."""
    found = [f for f in logging.getLogger().filters if isinstance(f, RedactSecrets)]
    shared = found[0] if found else RedactSecrets()
    named = [logging.getLogger(name) for name in LOGGERS]
    others = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    targets: list[logging.Filterer] = [*named]
    for logger in [*named, *others]:
        targets += logger.handlers
    for target in targets:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(shared)
    return shared
