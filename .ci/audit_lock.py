"""Audit requirements.lock with pip-audit, and say plainly when nothing could be audited.

pip-audit prints "No known vulnerabilities found" and exits 0 even when its database could not be
reached and every package was skipped (a registry mirror without PyPI's JSON API answers 404 for each
one). This wrapper reads pip-audit's JSON report instead of its exit code:

- vulnerabilities found: lists them and exits 1 (CI fails);
- some packages audited, none vulnerable: says how many, exits 0;
- no database reachable (PyPI's JSON API, then OSV): says so, names what was tried, exits 0, so a
  machine without internet still runs CI, but nobody reads the result as a clean audit.

Usage: ``python .ci/audit_lock.py requirements.lock``
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_audit(lock: str, service: str) -> tuple[dict[str, Any] | None, str]:
    """One pip-audit run over the lock (nothing installed); its JSON report, or None and why."""
    argv = [sys.executable, "-m", "pip_audit", "-r", lock, "--disable-pip", "--no-deps",
            "-s", service, "-f", "json", "--progress-spinner", "off", "--timeout", "20"]
    if service == "pypi":
        argv.append("--require-hashes")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(proc.stdout), ""
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{service}: {last[:200]}"


def main(lock: str) -> int:
    tried: list[str] = []
    for service in ("pypi", "osv"):
        report, failure = run_audit(lock, service)
        if report is None:
            tried.append(failure)
            continue
        deps = report.get("dependencies", [])
        audited = [d for d in deps if "skip_reason" not in d]
        if not audited:
            reason = deps[0]["skip_reason"] if deps else "no dependencies in the report"
            tried.append(f"{service}: every package skipped ({reason})")
            continue
        vulnerable = [d for d in audited if d.get("vulns")]
        for dep in vulnerable:
            for vuln in dep["vulns"]:
                fixes = ", ".join(vuln.get("fix_versions", [])) or "no fixed release"
                print(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})")
        skipped = len(deps) - len(audited)
        print(f"audit: {lock} checked against {service}: {len(audited)} packages audited, "
              f"{skipped} skipped, {len(vulnerable)} vulnerable")
        return 1 if vulnerable else 0
    print(f"audit: {lock} NOT audited: no vulnerability database could be reached")
    for line in tried:
        print(f"audit:   {line}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python .ci/audit_lock.py requirements.lock")
    sys.exit(main(sys.argv[1]))
