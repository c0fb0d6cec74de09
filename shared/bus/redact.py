"""Keeping tokens and secrets out of log lines: `redact`, the `RedactSecrets` filter, and `install`.

Every process of the mesh (the gateway, each service, an edge node, ``meetmesh up``) calls `install`
once its logging is configured. uvicorn logs every WebSocket it accepts through ``uvicorn.error``
with its whole URL (``"WebSocket /ws?token=eyJ..." [accepted]``), whatever ``access_log`` says, and
any library may log a header, a URL or an exception holding one. So `install` makes redaction
apply to every record, from any logger, whichever handlers are configured before or after it:

- a log-record factory that rewrites each record as it is made (every ``logger.info(...)`` of
  every logger goes through it, whatever handlers ``dictConfig`` puts in place later);
- the `RedactSecrets` filter on the root logger, uvicorn's loggers and every handler configured
  now (for records made elsewhere, e.g. ``logging.makeLogRecord`` from a socket handler);
- ``sys.excepthook`` and ``threading.excepthook``: an uncaught exception's traceback, printed to
  stderr outside logging, is redacted too.

A record is rewritten when its text holds a ``token=``/``secret=``/``password=``-style query or
form value, an ``Authorization: Bearer`` (or subprotocol ``bearer, <token>``) value, anything
shaped like a JWT, the password of a URL (``redis://:pw@host``), or a literal secret the process
knows (`add_secret`; `install` adds by itself the values of the ``MEETMESH_*SECRET``,
``MEETMESH_*PASSWORD`` and ``MEETMESH_TOKEN`` variables, or of the files their ``_FILE`` variants
name, and the data folder's development secret). Records are never dropped, only rewritten.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

__all__ = ["LOGGERS", "REDACTED", "RedactSecrets", "add_secret", "install", "redact"]

REDACTED = "[redacted]"
# uvicorn's loggers, the websockets library's, and the root one (which basicConfig and most apps use)
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets")
MIN_SECRET_CHARS = 8  # a shorter literal would redact ordinary words; patterns still apply
# variables holding a secret (or, with _FILE, naming the file that holds one)
_SECRET_NAMES = re.compile(r"^(MEETMESH_\w*(SECRET|PASSWORD)|MEETMESH_TOKEN)(_FILE)?$", re.IGNORECASE)
# A value already redacted (``token=[redacted]``) is left alone: `meetmesh up` redacts what it relays
# again, and must show that the child's own logging did it.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # a query or form value: ?token=..., &access_token=..., password=...
    (re.compile(r"(?i)\b((?:access_|refresh_|id_)?token|jwt|secret|password|api_key)=(?!\[)[^&\s\"'#;,]+"),
     r"\1={R}"),
    # Authorization: Bearer ..., and the subprotocol form "bearer, <token>"
    (re.compile(r"(?i)\b(bearer[\s,]+)[A-Za-z0-9._~+/=-]{8,}"), r"\1{R}"),
    # a JWT anywhere (header.payload.signature, the header base64url JSON: "eyJ")
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "{R}"),
    # a URL's password: scheme://user:password@host (redis://:pw@host too)
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?!\[)[^\s/@]+@"), r"\1{R}@"),
)
_secrets: set[str] = set()
_lock = threading.Lock()
_literal: re.Pattern[str] | None = None


def add_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears, from now on (a signing secret, a password). ``None``,
    empty and very short values (under `MIN_SECRET_CHARS`) are ignored."""
    global _literal
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # longest first, so a secret that contains another is hidden whole
        ordered = sorted(_secrets, key=len, reverse=True)
        _literal = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str, replacement: str = REDACTED) -> str:
    """``text`` with every token-like value and every known secret replaced by ``replacement``."""
    if _literal is not None:
        text = _literal.sub(lambda _: replacement, text)
    escaped = replacement.replace("\\", r"\\")
    for pattern, template in _PATTERNS:
        text = pattern.sub(template.replace("{R}", escaped), text)
    return text


def _clean(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # a bad format/args pair: logging reports it when the record is formatted
        return record
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and its formatted traceback) with `redact`; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _clean(record)
        return True


class _RedactingFactory:
    """The log-record factory `install` sets: the previous factory's record, redacted."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return _clean(self.inner(*args, **kwargs))


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))


def _secrets_in(environ: Mapping[str, str]) -> list[str | None]:
    """The values of ``environ``'s secret variables (a ``_FILE`` one read), and the data folder's
    development secret when there is one (what a dev-mode process signs with)."""
    from .credentials import data_dir, find_dev_secret, secret_from_env
    from .errors import ConfigError

    names = {m.group(1).upper() for m in map(_SECRET_NAMES.match, environ) if m is not None}
    found: list[str | None] = []
    for name in sorted(names):
        try:
            found.append(secret_from_env(name, environ))
        except ConfigError:  # unreadable, or set twice: the settings say so at start-up
            continue
    try:
        found.append(find_dev_secret(data_dir(environ)))
    except ConfigError:
        pass
    return found


def install(*, secrets: Iterable[str | None] = (), environ: Mapping[str, str] | None = None) -> RedactSecrets:
    """Make every log record of this process redacted (see the module's docstring); idempotent:
    call it again after the logging configuration changes (the filter then reaches new handlers).

    ``secrets``: literal values to hide besides the patterns (`add_secret`); the secrets named by
    ``environ`` (default ``os.environ``; see the module's docstring) are added too. Returns the
    filter, shared by every logger and handler."""
    for value in [*secrets, *_secrets_in(os.environ if environ is None else environ)]:
        add_secret(value)
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _thread_excepthook
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
