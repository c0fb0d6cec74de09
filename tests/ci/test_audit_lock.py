"""The lock audit's verdicts: vulnerable fails, clean passes, an unreachable database is said plainly."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "audit_lock.py"


@pytest.fixture
def audit() -> Any:
    spec = importlib.util.spec_from_file_location("audit_lock", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answers(audit: Any, monkeypatch: pytest.MonkeyPatch, **reports: Any) -> list[str]:
    asked: list[str] = []

    def run_audit(lock: str, service: str) -> tuple[Any, str]:
        asked.append(service)
        report = reports[service]
        return (None, f"{service}: unreachable") if report is None else (report, "")

    monkeypatch.setattr(audit, "run_audit", run_audit)
    return asked


def test_a_vulnerable_package_fails_and_is_named(audit: Any, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    answers(audit, monkeypatch, pypi={"dependencies": [
        {"name": "ok", "version": "1", "vulns": []},
        {"name": "bad", "version": "2", "vulns": [{"id": "GHSA-x", "fix_versions": ["2.1"]}]}]})
    assert audit.main("requirements.lock") == 1
    out = capsys.readouterr().out
    assert "bad 2: GHSA-x (fixed in 2.1)" in out
    assert "2 packages audited, 0 skipped, 1 vulnerable" in out


def test_a_clean_lock_passes_with_counts(audit: Any, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    answers(audit, monkeypatch, pypi={"dependencies": [
        {"name": "ok", "version": "1", "vulns": []}, {"name": "local", "skip_reason": "not on PyPI"}]})
    assert audit.main("requirements.lock") == 0
    assert "1 packages audited, 1 skipped, 0 vulnerable" in capsys.readouterr().out


def test_every_package_skipped_is_not_called_clean(audit: Any, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    asked = answers(audit, monkeypatch, pypi={"dependencies": [
        {"name": "a", "skip_reason": "Dependency not found on PyPI"}]}, osv=None)
    assert audit.main("requirements.lock") == 0
    out = capsys.readouterr().out
    assert asked == ["pypi", "osv"]
    assert "NOT audited" in out and "every package skipped" in out and "osv: unreachable" in out


def test_osv_answers_when_pypi_cannot(audit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    answers(audit, monkeypatch, pypi=None, osv={"dependencies": [
        {"name": "bad", "version": "2", "vulns": [{"id": "PYSEC-1", "fix_versions": []}]}]})
    assert audit.main("requirements.lock") == 1
