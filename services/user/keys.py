"""The user service's Redis keys, built here and nowhere else (the gateway reads them to refuse
revoked tokens; like `services.meeting.keys`, they live beside their service until they move to
`shared.bus.keys`)."""

from __future__ import annotations

import re

from shared.bus import InvalidMessage

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")  # as the bus's key prefixes


class UserKeys:
    """Keys of the user service under one prefix; each user's keys share the hash tag ``{user:<id>}``."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "mm") -> None:
        if not _PREFIX.match(prefix):
            raise InvalidMessage(f"invalid key prefix {prefix!r}: use 1-100 of A-Z a-z 0-9 . _ : -")
        self.prefix = prefix

    def tokens_not_before(self, user_id: str) -> str:
        """Unix time (a float, as text): the user's tokens issued before it are refused (the user was
        deleted, or lost a role). No expiry: one short key per such user."""
        return f"{self.prefix}:{{user:{user_id}}}:tokens-not-before"
