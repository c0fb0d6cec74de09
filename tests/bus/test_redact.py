"""`shared.bus.redact`: what it hides, and that once installed it reaches every logger and handler of a
process, those configured after it too, and uncaught tracebacks; a service's `main` installs it."""

from __future__ import annotations

import logging
import logging.config
import subprocess
import sys
import textwrap
from pathlib import Path

import jwt

from shared.bus.redact import REDACTED, RedactSecrets, redact

ROOT = Path(__file__).resolve().parents[2]
TOKEN = jwt.encode({"sub": "ann", "exp": 4_102_444_800}, "k" * 32, algorithm="HS256")


def test_patterns_hide_tokens_bearer_values_jwts_and_url_passwords() -> None:
    line = (f"GET /ws?token={TOKEN}&x=1 Authorization: Bearer {TOKEN} sub: bearer, abcdefgh12 "
            f"redis://:pa55word@127.0.0.1:6379/0 amqp://guest:guestpw@h/ password=hunter22 {TOKEN}")
    cleaned = redact(line)
    for secret in (TOKEN, TOKEN.split(".")[2], "pa55word", "guestpw", "hunter22", "abcdefgh12"):
        assert secret not in cleaned, cleaned
    assert "/ws?token=[redacted]&x=1" in cleaned and "Bearer [redacted]" in cleaned
    assert "redis://:[redacted]@127.0.0.1:6379/0" in cleaned and "amqp://guest:[redacted]@h/" in cleaned
    assert redact("x?token=abc", "[gone]") == "x?token=[gone]"
    assert redact(cleaned, "[again]") == cleaned   # what is redacted stays as it was (up relays it)
    ordinary = "GET /api/v1/tasks/ai.x 200 in 0.2 s; redis://127.0.0.1:6379/9; user alice"
    assert redact(ordinary) == ordinary   # nothing else is touched


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (logging's global state stays out of this process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_install_reaches_loggers_and_handlers_configured_later_and_uncaught_tracebacks() -> None:
    secret = "a-signing-secret-of-some-length"
    done = _run(f"""
        import logging, logging.config, sys, threading
        from shared.bus.redact import install
        install()
        # configured after install: a dictConfig handler on a non-propagating logger, as uvicorn does
        logging.config.dictConfig({{"version": 1, "disable_existing_loggers": False,
            "handlers": {{"err": {{"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}}}},
            "loggers": {{"lib": {{"handlers": ["err"], "level": "INFO", "propagate": False}}}}}})
        logging.getLogger("lib.deep").info('"WebSocket %s" [accepted]', "/ws?token={TOKEN}")
        logging.getLogger("lib").warning("signing with %s", "{secret}")
        try:
            raise ValueError("bad {TOKEN}")
        except ValueError:
            logging.getLogger("lib").exception("failed")
        t = threading.Thread(target=lambda: 1 / 0 if "{TOKEN}" else 0, name="t1"); t.start(); t.join()
        raise RuntimeError("uncaught {TOKEN}")
    """, MEETMESH_JWT_SECRET=secret, MEETMESH_DATA_DIR="/nonexistent", PYTHONPATH=str(ROOT))
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "uncaught [redacted]" in out, out
    assert f'"WebSocket /ws?token={REDACTED}" [accepted]' in out and f"signing with {REDACTED}" in out
    assert f"bad {REDACTED}" in out and "Exception in thread t1" in out
    assert TOKEN not in out and TOKEN.split(".")[2] not in out and secret not in out, out


def test_without_install_the_same_lines_carry_the_token() -> None:
    """The test above can fail: the same process without `install` prints the token."""
    done = _run(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("lib").info('"WebSocket %s" [accepted]', "/ws?token={TOKEN}")
    """)
    assert TOKEN in done.stderr, done.stderr


def test_a_service_main_installs_the_redaction(tmp_path: Path) -> None:
    """``meetmesh service NAME`` (services.common.service.main): its logging redacts from the start."""
    secret = "service-secret-" + "x" * 24
    done = _run(f"""
        import logging, sys
        import services.common.service as service
        def build(settings):
            logging.getLogger("services.probe").warning("token=%s secret %s", "{TOKEN}", settings.jwt_secret)
            sys.exit(0)
        service.load = lambda name: build
        service.main("probe")
    """, MEETMESH_JWT_SECRET=secret, MEETMESH_ENV="dev", MEETMESH_DATA_DIR=str(tmp_path),
        PYTHONPATH=str(ROOT))
    assert f"token={REDACTED} secret {REDACTED}" in done.stderr, done.stderr + done.stdout
    assert TOKEN not in done.stderr and secret not in done.stderr


def test_filter_on_a_handler_rewrites_records_of_other_factories() -> None:
    record = logging.makeLogRecord({"msg": "Bearer %s", "args": (TOKEN,), "levelno": logging.INFO})
    assert RedactSecrets().filter(record) and record.getMessage() == f"Bearer {REDACTED}"
