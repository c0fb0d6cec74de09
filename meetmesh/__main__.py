"""``python -m meetmesh ...``: the ``meetmesh`` command."""

from .main import main

main()
