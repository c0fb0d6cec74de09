"""The meeting service's Redis keys, built here and nowhere else.

(They belong in `shared.bus.keys` with the bus's own; that module is outside this service, so they
live here until they move. The gateway imports them from here to check who may follow a meeting.)
"""

from __future__ import annotations

import re

from shared.bus import InvalidMessage

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")  # as the bus's key prefixes


class MeetingKeys:
    """Keys of the meeting service under one prefix. Each meeting's keys share the hash tag
    ``{meeting:<id>}``, so they sit in one Redis Cluster slot and meetings spread over slots."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "mm") -> None:
        if not _PREFIX.match(prefix):
            raise InvalidMessage(f"invalid key prefix {prefix!r}: use 1-100 of A-Z a-z 0-9 . _ : -")
        self.prefix = prefix

    def participants(self, meeting_id: str) -> str:
        """Set of the user ids in the meeting now (kept by the meeting service; read by the gateway)."""
        return f"{self.prefix}:{{meeting:{meeting_id}}}:participants"

    def all_patterns(self) -> list[str]:
        return [f"{self.prefix}:\\{{meeting:*\\}}:*"]
