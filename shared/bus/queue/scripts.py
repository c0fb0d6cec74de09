"""The Lua scripts, loaded once per Redis client from the package's ``lua/`` folder.

Each ``lua/<command>-<numkeys>.lua`` opens with a header listing its KEYS, ARGV and return value;
``_lib.lua`` (helpers shared by all of them) is prepended at load time.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_NAMES = ("cancel-7", "dequeue-10", "enqueue-10", "progress-2", "purge-1", "ratelimit-2", "relay-release-1",
          "relay-renew-1", "renew-2", "replay-10", "settle-10", "wake-10")


@cache
def source(name: str) -> str:
    """The full text of one script, helpers included."""
    lua = files(__package__) / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """The bus's scripts registered on one client; ``scripts.enqueue(keys, args)`` runs one."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name.rsplit("-", 1)[0]: redis.register_script(source(name)) for name in _NAMES
        }

    async def load(self, name: str) -> str:
        """Make sure the script is in Redis's cache (SCRIPT LOAD is idempotent); returns its SHA1."""
        script = self._scripts[name]
        sha: str = await script.registered_client.script_load(script.script)
        return sha

    def sha(self, name: str) -> str:
        """The script's SHA1 (computed locally: Redis may not have it cached yet)."""
        return self._scripts[name].sha

    async def run(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run a script; with ``client`` a pipeline, queue it there (the pipeline loads it if need be)."""
        return await self._scripts[name](keys=keys, args=args, client=client)
