"""The user service: accounts, logins and tokens, profiles. ``python -m services.user``."""

from __future__ import annotations

from services.common import Service, ServiceSettings

from . import api, tasks
from .accounts import Accounts
from .models import Base


def build(settings: ServiceSettings | None = None, *, port: int | None = None) -> Service:
    """The user service, ready to ``run()`` (or ``start()``)."""
    service = Service("user", settings, metadata=[Base.metadata], port=port)
    accounts = Accounts(service)
    service.router = tasks.handlers(accounts)
    service.add_routes(api.routes(accounts))
    service.on_start(accounts.warm)
    return service
