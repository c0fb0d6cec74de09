"""``python -m services.meeting``: run the meeting service until SIGTERM."""

from services.common.service import main

main("meeting")
