"""MeetMesh's bus: reliable priority task queues on Redis and the worker that runs them; service
events (durable and broadcast) on Redis, NATS JetStream or RabbitMQ; the in-process bus; the scheduler."""

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
from .handlers import Context, Handler, Router
from .keys import DispatchKeys, EventKeys, LimitKeys, QueueKeys, SchedulerKeys
from .leases import Delivery
from .limiter import AdaptiveLimiter
from .message import Message, Priority, TaskError, TaskRecord, TaskStatus, new_id
from .queue import Enqueued, Queue
from .records import QueueStats
from .settings import BusSettings
from .worker import Worker

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
