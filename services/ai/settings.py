"""The ai service's settings: the service settings plus the edge bridge, the model and the limiter
(``MEETMESH_EDGE_*``, ``MEETMESH_AI_*``), read once; a bad value fails at start naming its variable."""

from __future__ import annotations

import re

from pydantic import Field, ValidationError

from services.common import ServiceSettings
from shared.bus import ConfigError
from shared.bus.edge.stackflow import DEFAULT_MODEL

_TCP = re.compile(r"^tcp://(?P<host>.+):(?P<port>\d+|\*)$")


class AiSettings(ServiceSettings):
    """`ServiceSettings` plus:

    - ``MEETMESH_EDGE_BIND`` (``tcp://127.0.0.1:5555``): where the bridge's ROUTER listens for edge
      nodes; ``tcp://host:*`` takes any free port (logged, and shown by ``GET /edge``).
    - ``MEETMESH_EDGE_PORT_OFFSET`` (0): added to that port, so replicas of one configuration bind
      5555, 5556, ... (replica ``i`` gets offset ``i``).
    - ``MEETMESH_EDGE_HEARTBEAT`` (1.0 s): the bridge's heartbeat; a node silent 3 beats is dropped.
    - ``MEETMESH_AI_MODEL`` (``smollm2-135m-instruct``, what ``meetmesh edge-node`` serves by default;
      ``echo`` for its test model): the model every LLM task asks the nodes for.
    - ``MEETMESH_AI_MAX_TOKENS`` (256): a task's answer length, by default and at most.
    - ``MEETMESH_AI_MAX_INPUT_CHARS`` (6000): the longest text a task may send (SmolLM2's context is
      2,048 tokens); a meeting transcript keeps its latest messages that fit.
    - ``MEETMESH_AI_REQUEST_TIMEOUT`` (120 s): one edge request, setup to last token.
    - ``MEETMESH_AI_LIMIT_INITIAL`` / ``_MIN`` / ``_MAX`` (8 / 1 / 32) and
      ``MEETMESH_AI_LIMIT_QUIET_SECONDS`` (30): the worker's adaptive (AIMD) concurrency: each "task
      full" from the nodes takes 2 off, each quiet period adds 1 back.
    - ``MEETMESH_MEETING_URL`` (``http://<MEETMESH_SERVICE_HOST>:<MEETMESH_MEETING_PORT>``): where the
      meeting service's REST is, for chat transcripts.
    """

    edge_bind: str = Field(default="tcp://127.0.0.1:5555", pattern=r"^(tcp|ipc|inproc)://.+$")
    edge_port_offset: int = Field(default=0, ge=0, le=10_000)
    edge_heartbeat: float = Field(default=1.0, gt=0)
    ai_model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=200)
    ai_max_tokens: int = Field(default=256, ge=1, le=32_768)
    ai_max_input_chars: int = Field(default=6000, ge=100)
    ai_request_timeout: float = Field(default=120.0, gt=0)
    ai_limit_initial: int = Field(default=8, ge=1)
    ai_limit_min: int = Field(default=1, ge=1)
    ai_limit_max: int = Field(default=32, ge=1)
    ai_limit_quiet_seconds: float = Field(default=30.0, gt=0)
    meeting_url: str | None = Field(default=None, pattern=r"^https?://")

    @property
    def edge_endpoint(self) -> str:
        """``MEETMESH_EDGE_BIND`` with ``MEETMESH_EDGE_PORT_OFFSET`` added to its port."""
        if not self.edge_port_offset:
            return self.edge_bind
        match = _TCP.match(self.edge_bind)
        if match is None:
            raise ConfigError("MEETMESH_EDGE_PORT_OFFSET needs MEETMESH_EDGE_BIND to be tcp://host:port, "
                              f"not {self.edge_bind!r}")
        if match["port"] == "*":
            return self.edge_bind  # any free port already
        port = int(match["port"]) + self.edge_port_offset
        if port > 65535:
            raise ConfigError(f"MEETMESH_EDGE_BIND's port plus MEETMESH_EDGE_PORT_OFFSET is {port} (> 65535)")
        return f"tcp://{match['host']}:{port}"

    def check(self) -> AiSettings:
        """Cross-field checks (`ConfigError` naming the variables); returns itself."""
        if not self.ai_limit_min <= self.ai_limit_initial <= self.ai_limit_max:
            got = f"{self.ai_limit_min}, {self.ai_limit_initial}, {self.ai_limit_max}"
            raise ConfigError("need MEETMESH_AI_LIMIT_MIN <= MEETMESH_AI_LIMIT_INITIAL <= "
                              f"MEETMESH_AI_LIMIT_MAX (got {got})")
        _ = self.edge_endpoint
        return self

    @classmethod
    def of(cls, settings: ServiceSettings | None) -> AiSettings:
        """``settings`` as they are, with the ai service's own read from the environment (all of them
        from the environment when ``settings`` is None)."""
        if isinstance(settings, AiSettings):
            return settings.check()
        try:
            ai = cls(**settings.model_dump()) if settings is not None else cls()
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"MEETMESH_{str(err['loc'][0]).upper()}: {err['msg']}") from exc
        return ai.check()
