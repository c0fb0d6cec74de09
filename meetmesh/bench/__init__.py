"""The ``meetmesh bench`` commands: `queue` (enqueue and drain rates, start latency), `events` (the
event backends), `edge` (the bridge's overhead), `ws` (the gateway's WebSocket round trip)."""
