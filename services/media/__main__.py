"""``python -m services.media``: run the media service until SIGTERM."""

from services.common.service import main

main("media")
