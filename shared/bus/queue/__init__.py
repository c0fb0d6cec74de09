"""Task queues: the Redis queue (``queue``) with its leases and deliveries (``leases``), the worker that
runs handlers (``worker``) registered on a router (``handlers``), the message and task-record types
(``message``, parsed back from Redis by ``records``), the adaptive concurrency limiter (``limiter``),
and the Lua scripts (``lua/``, one file per command) with their loader (``scripts``)."""
