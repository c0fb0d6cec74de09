"""Service events: the broker-neutral base (``base``: ``EventBus``, retention, broadcast, dead events) and
one module per broker (``redis``, ``nats``, ``amqp``), the event catalogue (``catalogue``), the in-process
bus (``local``), the scheduler that fires events on a timetable (``scheduler``) and the AsyncAPI document
of the catalogue (``asyncapi``)."""
