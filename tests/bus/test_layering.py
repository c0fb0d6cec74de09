"""The layers, checked on the source: the bus library (`shared/bus/`) imports none of the packages
built on it, at any depth, lazily or not; the gateway and the services never import the apps above
them (the `meetmesh` CLI, the reference edge node, the chaos scenarios). Every Import/ImportFrom
node counts, inside functions and ``if TYPE_CHECKING`` blocks too, with relative imports resolved
against the importing module."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Which top-level packages each layer must never import.
ABOVE_THE_LIBRARY = ("gateway", "services", "meetmesh", "edge_node", "reliability", "bench", "tests")
ABOVE_THE_GATEWAY_AND_SERVICES = ("meetmesh", "edge_node", "reliability", "bench", "tests")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``'s source, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(package[: len(package) - (node.level - 1)])
                target = ".".join(part for part in (prefix, node.module) if part)
            else:
                target = node.module or ""
            yield node.lineno, target
            # ``from . import x`` / ``from pkg import sub``: the names may be modules too.
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def violations(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """``file:line: imports module`` for each import under ``root/folder`` of a ``forbidden`` package."""
    found = []
    files = sorted((root / folder).rglob("*.py"))
    assert files, f"no modules under {folder}/"
    for path in files:
        for line, target in imported_modules(path, root):
            if target.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(root)}:{line}: imports {target}")
    return sorted(set(found))


def test_the_checker_sees_lazy_guarded_and_relative_imports(tmp_path: Path) -> None:
    # The checker itself, on a probe package: an import inside a function and one under
    # TYPE_CHECKING are reported with their lines; relative ones resolve against the module.
    package = tmp_path / "shared" / "bus" / "queue"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import leases\nfrom .leases import Lease\n")
    (package / "probe.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import gateway.app\n"
        "def f() -> None:\n    from meetmesh.main import app\n"
        "from ..keys import QueueKeys\n"
        "from . import leases\n")
    assert violations("shared/bus", ABOVE_THE_LIBRARY, tmp_path) == [
        "shared/bus/queue/probe.py:3: imports gateway.app",
        "shared/bus/queue/probe.py:5: imports meetmesh.main",
        "shared/bus/queue/probe.py:5: imports meetmesh.main.app",
    ]
    probe = dict((target, line) for line, target in imported_modules(package / "probe.py", tmp_path))
    assert probe["shared.bus.keys"] == 6 and probe["shared.bus.queue.leases"] == 7
    init = {target for _, target in imported_modules(package / "__init__.py", tmp_path)}
    assert {"shared.bus.queue.leases", "shared.bus.queue.leases.Lease"} <= init


def test_the_bus_library_imports_nothing_built_on_it() -> None:
    found = violations("shared/bus", ABOVE_THE_LIBRARY)
    assert not found, "shared/bus is the library; these imports reach above it:\n" + "\n".join(found)


@pytest.mark.parametrize("folder", ["gateway", "services"])
def test_the_gateway_and_services_never_import_the_apps(folder: str) -> None:
    found = violations(folder, ABOVE_THE_GATEWAY_AND_SERVICES)
    assert not found, f"{folder}/ sits below the apps; these imports reach up:\n" + "\n".join(found)
