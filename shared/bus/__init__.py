"""MeetMesh's bus: reliable priority task queues on Redis and the worker that runs them; service
events (durable and broadcast) on Redis, NATS JetStream or RabbitMQ; the in-process bus; the scheduler.

The layout, one concept per sub-package: ``queue/`` (the queue, leases, worker, handlers, messages and
records, the limiter, the Lua scripts), ``events/`` (the event bus base and one module per broker, the
catalogue, the local bus, the scheduler, the AsyncAPI document), ``dispatch/`` (the dispatcher, the
per-user rate limit, the relay of task updates) and ``edge/`` (the bridge pool, the ZeroMQ link and its
keys, the StackFlow wire schema and TCP transport). Flat at the top is only what every part shares:
``errors``, ``keys``, ``settings``, ``connection``, ``backoff``, ``credentials`` and ``redact``. What
services and clients use is re-exported here (``__all__``); the rest is imported from its sub-package."""

from .backoff import backoff
from .connection import connect
from .dispatch.dispatcher import Dispatcher, Submitted, TaskUpdate
from .dispatch.ratelimit import LimitExceeded, UserLimits
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
    ScheduleNotFound,
    TaskNotFound,
)
from .events.base import BroadcastMessage, DeadEvent, EventBus, EventStats, Listener, Retention
from .events.catalogue import Event, Payload, make_event
from .events.local import BusClosed, LocalBus, LocalBusStats
from .events.scheduler import Firing, Schedule, ScheduleInfo, Scheduler
from .keys import DispatchKeys, EventKeys, LimitKeys, QueueKeys, SchedulerKeys
from .queue.handlers import Context, Handler, Router
from .queue.leases import Delivery
from .queue.limiter import AdaptiveLimiter
from .queue.message import Message, Priority, TaskError, TaskRecord, TaskStatus, new_id
from .queue.queue import Enqueued, Queue
from .queue.records import QueueStats
from .queue.worker import Worker
from .settings import BusSettings

__all__ = [
    "AdaptiveLimiter",
    "BroadcastMessage",
    "BusClosed",
    "BusConnectionError",
    "BusError",
    "BusSettings",
    "ConfigError",
    "Context",
    "DeadEvent",
    "Delivery",
    "DispatchKeys",
    "Dispatcher",
    "Enqueued",
    "Event",
    "EventBus",
    "EventKeys",
    "EventStats",
    "Firing",
    "Handler",
    "HandlerSignal",
    "IllegalTransition",
    "InvalidMessage",
    "LimitExceeded",
    "LimitKeys",
    "Listener",
    "LocalBus",
    "LocalBusStats",
    "Message",
    "MessageTooLarge",
    "Payload",
    "Priority",
    "Queue",
    "QueueKeys",
    "QueueStats",
    "RateLimited",
    "Reject",
    "Retention",
    "Retry",
    "Router",
    "Schedule",
    "ScheduleInfo",
    "ScheduleNotFound",
    "Scheduler",
    "SchedulerKeys",
    "Submitted",
    "TaskError",
    "TaskNotFound",
    "TaskRecord",
    "TaskStatus",
    "TaskUpdate",
    "UserLimits",
    "Worker",
    "backoff",
    "connect",
    "make_event",
    "new_id",
]
