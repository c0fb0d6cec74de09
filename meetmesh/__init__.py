"""The ``meetmesh`` command-line app, on top of the bus library (`shared.bus`): the entry and its
commands (`main`), the helpers they share (`common`), ``up``, ``submit``, ``demo``, the schedule, edge
and user sub-commands, and every ``bench`` command (`meetmesh.bench`). Nothing in the library imports it."""
