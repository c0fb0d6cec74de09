"""MeetMesh's bus: reliable priority task queues on Redis, and the worker that runs them."""

from .connection import connect
from .errors import (
    BusConnectionError,
    BusError,
    ConfigError,
    HandlerSignal,
    IllegalTransition,
    InvalidMessage,
    MessageTooLarge,
    RateLimited,
    Reject,
    Retry,
    TaskNotFound,
)
from .handlers import Context, Handler, Router
from .keys import QueueKeys
from .leases import Delivery
from .limiter import AdaptiveLimiter
from .message import Message, Priority, TaskError, TaskRecord, TaskStatus, new_id
from .queue import Enqueued, Queue
from .records import QueueStats
from .settings import BusSettings
from .worker import Worker

__all__ = [
    "AdaptiveLimiter",
    "BusConnectionError",
    "BusError",
    "BusSettings",
    "ConfigError",
    "Context",
    "Delivery",
    "Enqueued",
    "Handler",
    "HandlerSignal",
    "IllegalTransition",
    "InvalidMessage",
    "Message",
    "MessageTooLarge",
    "Priority",
    "Queue",
    "QueueKeys",
    "QueueStats",
    "RateLimited",
    "Reject",
    "Retry",
    "Router",
    "TaskError",
    "TaskNotFound",
    "TaskRecord",
    "TaskStatus",
    "Worker",
    "connect",
    "new_id",
]
