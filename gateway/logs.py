"""Keeping tokens and secrets out of the gateway's log lines: the bus's `shared.bus.redact`, as the
gateway uses it (`redact`, the `RedactSecrets` filter, `install`).

uvicorn logs every WebSocket it accepts through ``uvicorn.error`` with its whole URL
(``"WebSocket /ws?token=eyJ..." [accepted]``), whatever ``access_log`` says, and any library may
log a header or a URL. `install` (called when the app is made and again when it starts, after
uvicorn configured its logging) makes every record of the process redacted: ``token=``-style query
values, ``Authorization: Bearer`` values, JWT-shaped strings, URL passwords and the process's known
secrets (see `shared.bus.redact`, which every other process of the mesh installs too).
"""

from __future__ import annotations

from shared.bus.redact import LOGGERS, REDACTED, RedactSecrets, add_secret, install, redact

__all__ = ["LOGGERS", "REDACTED", "RedactSecrets", "add_secret", "install", "redact"]
