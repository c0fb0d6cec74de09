"""``python -m services.ai``: run the ai service until SIGTERM."""

from services.common.service import main

main("ai")
