"""The gateway: FastAPI on uvicorn. REST (tasks, queues), WebSocket sessions and SSE for live task
updates, health, readiness and Prometheus metrics. Built only on `shared.bus`'s public API."""

from .app import create_app

__all__ = ["create_app"]
