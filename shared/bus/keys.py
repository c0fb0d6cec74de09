"""Every Redis key and channel the bus uses, built here and nowhere else.

All keys of one queue share the hash tag ``{name}`` (``mm:{orders}:ready``), so every script
touches a single Redis Cluster slot.
"""

from __future__ import annotations

import hashlib
import re

from .errors import InvalidMessage

DEFAULT_PREFIX = "mm"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


def check_name(kind: str, value: str) -> str:
    """Queue names and prefixes: 1-100 of ``A-Z a-z 0-9 . _ : -``, so they can never break a hash tag."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidMessage(f"invalid {kind} {value!r}: use 1-100 characters from A-Z a-z 0-9 . _ : -")
    return value


DEDUPE_SCOPES = ("owner", "queue")


def dedupe_suffix(dedupe_key: str, owner: str | None, scope: str = "owner") -> str:
    """What follows a queue's ``dedupe_prefix`` for this key. Scope ``"owner"`` (the default) puts
    the owner in it, length first (``5:alice:<key>``), so two owners never share one; ``"queue"``
    shares the key among every producer of the queue (``<key>``: trusted internal producers)."""
    if scope == "queue":
        return dedupe_key
    return f"{len(owner or '')}:{owner or ''}:{dedupe_key}"


class QueueKeys:
    """The keys of one queue. ``task(id)`` is the per-message record hash."""

    __slots__ = (
        "control", "dead", "dedupe_prefix", "delayed", "depth", "events", "idle", "inbox_prefix",
        "latency", "leases", "name", "paused", "rate_prefix", "ready", "stats", "tag", "task_prefix",
        "workers",
    )

    def __init__(self, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.name = check_name("queue name", name)
        tag = f"{check_name('key prefix', prefix)}:{{{name}}}"
        self.tag = tag
        self.ready = f"{tag}:ready"          # zset id -> order score (level * weight + ready time)
        self.delayed = f"{tag}:delayed"      # zset id -> due time (ms)
        self.leases = f"{tag}:leases"        # zset id -> lease deadline (ms)
        self.dead = f"{tag}:dead"            # zset id -> time it died (ms)
        self.depth = f"{tag}:depth"          # hash level -> ready count
        self.stats = f"{tag}:stats"          # hash of counters (enqueued, processed, failed, ...)
        self.paused = f"{tag}:paused"        # string, present while paused
        self.events = f"{tag}:events"        # stream of every status change
        self.latency = f"{tag}:latency"      # list of recent start-latency samples (ms)
        self.workers = f"{tag}:workers"      # zset worker id -> when judged dead (ms): heartbeat + lease
        self.idle = f"{tag}:idle"            # zset "lease_ms:worker" -> registration deadline (ms)
        self.inbox_prefix = f"{tag}:inbox:"  # + worker id: list of deliveries handed to an idle worker
        self.control = f"{tag}:control"      # pub/sub channel: cancel this running task
        self.task_prefix = f"{tag}:task:"    # + id: hash, the task record
        self.dedupe_prefix = f"{tag}:dedupe:"  # + dedupe key: the first message's id
        self.rate_prefix = f"{tag}:rate:"    # + epoch second: hash of per-second counters

    def task(self, task_id: str) -> str:
        return self.task_prefix + task_id

    def inbox(self, worker: str) -> str:
        return self.inbox_prefix + worker

    def dedupe(self, dedupe_key: str, owner: str | None = None, *, scope: str = "owner") -> str:
        """The dedupe key's Redis key (``dedupe_prefix`` + `dedupe_suffix`)."""
        return self.dedupe_prefix + dedupe_suffix(dedupe_key, owner, scope)

    def layout(self) -> list[str]:
        """The KEYS every queue script takes, in order (see lua/_lib.lua)."""
        return [self.ready, self.delayed, self.leases, self.depth, self.events, self.paused, self.latency,
                self.dead, self.stats, self.idle]

    def rate(self, second: int) -> str:
        return f"{self.rate_prefix}{second}"

    def all_patterns(self) -> list[str]:
        """SCAN patterns that match every key of this queue (for purge and test clean-up)."""
        return [self.tag.replace("{", "\\{").replace("}", "\\}") + ":*"]


class EventKeys:
    """The Redis keys and channels of the event bus under one prefix. Durable streams share the hash
    tag ``{events}``; broadcast channels are pub/sub, which Redis Cluster does not shard by slot."""

    __slots__ = ("broadcast_pattern", "log", "prefix", "tag")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = check_name("key prefix", prefix)
        self.tag = f"{prefix}:{{events}}"
        self.log = f"{self.tag}:log"                     # stream: every durable event, in publish order
        self.broadcast_pattern = f"{prefix}:bc:*"       # PSUBSCRIBE pattern of every broadcast channel

    def dead(self, service: str) -> str:
        """Stream of one service's dead-lettered events (a JSON `DeadEvent` per entry)."""
        return f"{self.tag}:dead:{service}"

    def broadcast(self, topic: str) -> str:
        return f"{self.prefix}:bc:{topic}"

    def all_patterns(self) -> list[str]:
        return [self.tag.replace("{", "\\{").replace("}", "\\}") + ":*"]


class SchedulerKeys:
    """The keys of the cluster-wide scheduler, one set per key prefix.

    The hash tag ``{_schedules}`` starts with ``_``, which `check_name` refuses as a queue name's
    first character, so no queue's keys (or its ``drop()`` pattern) can ever overlap these.
    """

    __slots__ = ("fired", "specs", "state", "tag")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        tag = f"{check_name('key prefix', prefix)}:{{_schedules}}"
        self.tag = tag
        self.specs = f"{tag}:specs"  # hash schedule name -> Schedule JSON
        self.fired = f"{tag}:fired"  # zset schedule name -> last tick fired (epoch ms); only moves forward
        self.state = f"{tag}:state"  # hash schedule name -> JSON of the last firing (tick, time, task id)


class DispatchKeys:
    """The keys of the task dispatcher, one set per key prefix, shared by every gateway instance.

    The hash tag ``{_dispatch}`` starts with ``_``, which `check_name` refuses as a queue name's first
    character, so no queue's keys (or its ``drop()`` pattern) can ever overlap these.
    """

    __slots__ = ("deadlines", "followers", "relay_lease", "tag")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        tag = f"{check_name('key prefix', prefix)}:{{_dispatch}}"
        self.tag = tag
        self.deadlines = f"{tag}:deadlines"  # zset task id -> deadline (epoch ms), until it finishes
        self.relay_lease = f"{tag}:relay-lease"  # string: id of the instance relaying updates, with a TTL
        self.followers = f"{tag}:followers"  # zset instance id -> until (epoch ms): who follows updates

    def all_patterns(self) -> list[str]:
        return [self.tag.replace("{", "\\{").replace("}", "\\}") + ":*"]


_SAFE_USER = re.compile(r"^[A-Za-z0-9._@-]{1,100}$")


class LimitKeys:
    """The keys of one user's limits (`ratelimit.UserLimits`), shared by every gateway instance.

    Each user's keys share the hash tag ``{_limits:<user>}`` (one Cluster slot per user, so the
    admission script touches one slot and users spread over the cluster). A user id outside
    ``A-Z a-z 0-9 . _ @ -`` (or longer than 100) is replaced by its SHA-256, so it cannot break
    the tag; the leading ``_`` keeps these apart from every queue's keys, as for `DispatchKeys`.
    """

    __slots__ = ("sockets", "submit", "swept", "tag", "tasks")

    def __init__(self, user: str, prefix: str = DEFAULT_PREFIX) -> None:
        who = user if _SAFE_USER.match(user) else "h:" + hashlib.sha256(user.encode()).hexdigest()[:32]
        tag = f"{check_name('key prefix', prefix)}:{{_limits:{who}}}"
        self.tag = tag
        self.submit = f"{tag}:submit"    # hash tokens, stamp (ms): the submission token bucket
        self.sockets = f"{tag}:sockets"  # zset socket id -> expiry (ms), renewed while it is open
        self.tasks = f"{tag}:tasks"      # zset task id -> expiry (ms): tasks queued and not finished
        self.swept = f"{tag}:swept"      # string with a TTL: finished tasks were swept from `tasks`
