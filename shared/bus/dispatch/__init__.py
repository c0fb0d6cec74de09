"""Task dispatch: the dispatcher that admits a client's task and routes it to a service's queue
(``dispatcher``), its per-user token buckets in Redis (``ratelimit``), the relay that carries each
task's status changes back to the gateways under one lease (``relay``), and the task-update types it
broadcasts, with the sequence filter that drops repeats on the receiving side (``updates``)."""
