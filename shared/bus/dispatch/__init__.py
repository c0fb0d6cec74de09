"""Task dispatch: the dispatcher that admits a client's task and routes it to a service's queue
(``dispatcher``), its per-user token buckets in Redis (``ratelimit``), and the relay that carries each
task's updates back to the gateway that submitted it under one lease per gateway (``relay``, which also
defines the ``TaskUpdate`` type and the sequence filter)."""
