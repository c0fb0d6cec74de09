"""``python -m services.user``: run the user service until SIGTERM."""

from services.common.service import main

main("user")
