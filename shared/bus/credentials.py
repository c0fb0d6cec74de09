"""Secrets in settings: read from the environment or from a file (``*_FILE``), checked for strength,
and the explicit development mode (``MEETMESH_ENV=dev``), the only place a generated one is accepted.

- `SecretFiles`: a pydantic-settings source that reads a secret field ``x`` from the file named by
  ``MEETMESH_X_FILE`` (Docker and Kubernetes secrets are files). Setting both ``MEETMESH_X`` and
  ``MEETMESH_X_FILE`` is an error: which one wins would be a guess.
- `check_secret`: outside development mode a missing secret, one under `MIN_SECRET_BYTES` bytes or
  a known development value is an error naming the variable; in development mode a missing one is
  the development secret of the data folder (`dev_secret`).
- `dev_secret` / `find_dev_secret`: ``<data folder>/dev-secret`` (mode 0600), made once and kept, so
  a restarted development mesh still accepts the tokens it signed, and ``meetmesh token`` or
  ``meetmesh submit`` in another shell sign with the same secret. The data folder is
  ``MEETMESH_DATA_DIR`` (default ``./.meetmesh``), the one ``meetmesh up`` uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from .errors import ConfigError

log = logging.getLogger(__name__)
ENV_VARIABLE = "MEETMESH_ENV"
DEV = "dev"
PRODUCTION = "production"
MIN_SECRET_BYTES = 32
DEV_SECRET_FILE = "dev-secret"
DEFAULT_DATA_DIR = ".meetmesh"
# Values published in this project's code, docs or history: whoever reads them can sign tokens.
KNOWN_DEV_SECRETS = frozenset({"meetmesh-development-secret-change-me-now"})


def is_dev(value: object) -> bool:
    """Whether a ``MEETMESH_ENV`` value means development mode (``dev``, any case); anything else
    is production, where secrets are required."""
    return isinstance(value, str) and value.strip().lower() == DEV


def dev_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``MEETMESH_ENV=dev`` (development mode) is set."""
    env = os.environ if environ is None else environ
    return is_dev(env.get(ENV_VARIABLE, ""))


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The mesh's data folder: ``MEETMESH_DATA_DIR``, else ``./.meetmesh``."""
    env = os.environ if environ is None else environ
    return Path(env.get("MEETMESH_DATA_DIR") or DEFAULT_DATA_DIR)


def read_secret_file(variable: str, path: str | Path) -> str:
    """The secret in the file ``variable`` names, without the trailing newline editors add."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{variable}: cannot read the secret file {str(path)!r}: {exc}") from exc
    value = text.rstrip("\r\n")
    if not value:
        raise ConfigError(f"{variable}: the secret file {str(path)!r} is empty")
    return value


def _lookup(environ: Mapping[str, str], name: str) -> str | None:
    """``environ[name]`` as pydantic-settings reads it (names are case-insensitive)."""
    if name in environ:
        return environ[name]
    lowered = name.lower()
    return next((v for k, v in environ.items() if k.lower() == lowered), None)


def secret_from_env(variable: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``$VARIABLE``, else the content of the file ``$VARIABLE_FILE`` names, else None."""
    env = os.environ if environ is None else environ
    value, path = _lookup(env, variable), _lookup(env, variable + "_FILE")
    if value and path:
        raise ConfigError(f"{variable} and {variable}_FILE are both set: set one of them")
    if path:
        return read_secret_file(variable + "_FILE", path)
    return value or None


class SecretFiles(PydanticBaseSettingsSource):
    """Reads each of ``fields`` from the file ``<env_prefix><FIELD>_FILE`` names (when set).

    Use in ``settings_customise_sources``, after the environment: ``SecretFiles(cls, ["jwt_secret"])``.
    """

    def __init__(self, settings_cls: type[BaseSettings], fields: Iterable[str]) -> None:
        super().__init__(settings_cls)
        self.fields = tuple(fields)
        self.prefix = str(self.config.get("env_prefix", "")).upper()

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False   # everything is done in __call__

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in self.fields:
            value = secret_from_env(self.prefix + name.upper())
            if value is not None:
                found[name] = value
        return found


def check_secret(value: str | None, variable: str, *, dev: bool, folder: Path | None = None) -> str:
    """``value`` if it may sign tokens; in development mode a missing one is the folder's dev secret.

    `ValueError` (pydantic reports it under the field's name) for a missing, short or known one.
    """
    if not value:
        if dev:
            path = dev_secret_path(folder)
            secret = dev_secret(folder)
            log.warning("%s=dev: %s is not set; signing with the development secret in %s",
                        ENV_VARIABLE, variable, path)
            return secret
        raise ValueError(
            f"{variable} is not set: give a random secret of {MIN_SECRET_BYTES}+ bytes (e.g. `python -c "
            f"'import secrets; print(secrets.token_urlsafe(32))'`) in {variable} or in a file named by "
            f"{variable}_FILE, or set {ENV_VARIABLE}={DEV} for a local development run")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"{variable} is too short: at least {MIN_SECRET_BYTES} bytes")
    if value in KNOWN_DEV_SECRETS and not dev:
        raise ValueError(f"{variable} is a published development value: use a secret of your own")
    return value


def dev_secret_path(folder: Path | None = None) -> Path:
    """``<data folder>/dev-secret``."""
    return (folder if folder is not None else data_dir()) / DEV_SECRET_FILE


def find_dev_secret(folder: Path | None = None) -> str | None:
    """The data folder's development secret, if one was made (by ``meetmesh up`` or a dev-mode start)."""
    path = dev_secret_path(folder)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the development secret {str(path)!r}: {exc}") from exc
    return value or None


def dev_secret(folder: Path | None = None) -> str:
    """The data folder's development secret, made (mode 0600) when there is none yet.

    Processes starting together agree: the file is written whole under a temporary name, then linked
    into place, which fails for all but the first; the others read the winner's.
    """
    existing = find_dev_secret(folder)
    if existing is not None:
        if len(existing.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"the development secret {str(dev_secret_path(folder))!r} is too short: "
                              "delete it to have a new one made")
        return existing
    path = dev_secret_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{DEV_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    made = find_dev_secret(folder)
    if made is None:
        raise ConfigError(f"cannot keep the development secret in {str(path)!r}")
    return made


def signing_secret(variable: str = "MEETMESH_JWT_SECRET",
                   environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """For tools that sign tokens for a running mesh (``meetmesh token``, ``meetmesh submit``): the
    configured secret (``$VARIABLE`` or ``$VARIABLE_FILE``), else the data folder's development secret
    if ``meetmesh up`` made one (never made here); with where it came from. None: neither."""
    configured = secret_from_env(variable, environ)
    if configured is not None:
        return configured, variable
    folder = data_dir(environ)
    found = find_dev_secret(folder)
    if found is not None:
        return found, str(dev_secret_path(folder))
    return None
