"""``meetmesh chaos``: fault scenarios that run the mesh's parts, break them, and print a summary."""

from __future__ import annotations

import typer

app = typer.Typer(help="Fault scenarios: break parts of the mesh on purpose and report what survived.",
                  no_args_is_help=True)


def register(root: typer.Typer) -> None:
    """Add ``chaos`` to the ``meetmesh`` command."""
    root.add_typer(app, name="chaos")
