"""Public API hygiene: what ``shared.bus`` exports, and what the package ships besides Python."""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import shutil
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

import shared.bus
from shared.bus.queue import scripts

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(shared.bus.__file__).resolve().parent


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _shipped_data_files() -> list[str]:
    """Non-Python files in the package, relative to it (what must be declared as package data)."""
    return sorted(str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


# -- exports ---------------------------------------------------------------------------------------


def test_all_is_sorted_and_unique() -> None:
    names = shared.bus.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_exported_name_resolves() -> None:
    for name in shared.bus.__all__:
        assert getattr(shared.bus, name, None) is not None, f"shared.bus.{name} is in __all__ but missing"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from shared.bus import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(shared.bus.__all__)


def test_public_classes_and_functions_are_documented() -> None:
    for name in shared.bus.__all__:
        obj = getattr(shared.bus, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"shared.bus.{name} has no docstring"
            assert obj.__module__.startswith("shared.bus"), f"{name} comes from {obj.__module__}"


def test_public_class_names_are_exported() -> None:
    """Every public class defined in the bus's core modules is reachable from ``shared.bus``."""
    core = ("errors", "queue.handlers", "keys", "queue.limiter", "queue.message", "queue.queue",
            "queue.records", "settings", "queue.worker")
    exported = {id(getattr(shared.bus, n)) for n in shared.bus.__all__}
    missing = []
    for module_name in core:
        module = importlib.import_module(f"shared.bus.{module_name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
                    and id(obj) not in exported
                    and (issubclass(obj, Exception) or name in ("Queue", "Worker", "Message", "Router"))):
                missing.append(f"{module_name}.{name}")
    assert missing == [], f"public exceptions/classes not exported from shared.bus: {missing}"


def test_error_hierarchy() -> None:
    bus = shared.bus
    for err in (bus.ConfigError, bus.BusConnectionError, bus.InvalidMessage, bus.TaskNotFound,
                bus.IllegalTransition):
        assert issubclass(err, bus.BusError)
    assert issubclass(bus.MessageTooLarge, bus.InvalidMessage)
    assert issubclass(bus.RateLimited, bus.Retry)
    for signal in (bus.Retry, bus.Reject):
        assert issubclass(signal, bus.HandlerSignal)
        assert not issubclass(signal, bus.BusError)


# -- package data ----------------------------------------------------------------------------------


def test_package_data_declares_py_typed_and_every_lua_file() -> None:
    declared = _pyproject()["tool"]["setuptools"]["package-data"]["shared.bus"]
    data = _shipped_data_files()
    assert "py.typed" in data
    lua = [f for f in data if f.endswith(".lua")]
    assert lua, "no Lua scripts found in the package"
    undeclared = [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in declared)]
    assert undeclared == [], f"files in shared/bus not covered by package-data {declared}: {undeclared}"


def test_resources_are_reachable_through_importlib() -> None:
    root = files("shared.bus")
    assert root.joinpath("py.typed").is_file()
    lua = {entry.name for entry in root.joinpath("queue", "lua").iterdir() if entry.name.endswith(".lua")}
    on_disk = {p.name for p in (PACKAGE_DIR / "queue" / "lua").glob("*.lua")}
    assert lua == on_disk
    assert "_lib.lua" in lua


def test_every_script_is_a_file_and_every_file_is_used() -> None:
    names = set(scripts._NAMES)
    on_disk = {p.stem for p in (PACKAGE_DIR / "queue" / "lua").glob("*.lua")} - {"_lib"}
    assert names - on_disk == set(), "scripts.py names scripts that do not exist"
    assert on_disk - names == set(), "Lua files nobody loads (stale after a rename?)"
    for name in names:
        text = scripts.source(name)
        assert text.startswith(files("shared.bus").joinpath("queue", "lua", "_lib.lua").read_text())


async def test_every_script_compiles_in_redis(redis: Any) -> None:
    for name in scripts._NAMES:
        sha = await redis.script_load(scripts.source(name))
        assert len(sha) == 40, name


def test_a_build_ships_py_typed_and_the_lua_scripts(tmp_path: Path) -> None:
    """Build the package (setuptools build_py, from a copy of the project) and look at what it ships."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "shared", project / "shared",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "build"
    proc = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d", str(out)],
        cwd=project, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = out / "shared" / "bus"
    assert (built / "py.typed").is_file()
    expected = sorted(p.name for p in (PACKAGE_DIR / "queue" / "lua").glob("*.lua"))
    assert sorted(p.name for p in (built / "queue" / "lua").glob("*.lua")) == expected
