#!/usr/bin/env bash
# Interleaved runs of `meetmesh bench ws` and its bare floor, for comparisons on a noisy machine.
#
#   bench/ws_pairs.sh 5                  # 5 x (this tree, then the floor)
#   bench/ws_pairs.sh 5 /tmp/before      # 5 x (the tree at /tmp/before, this tree, the floor)
#                                        #   e.g. git worktree add /tmp/before <rev>
#
# Each line: which, p50 and p99 ms, CPU per task (us) of the gateway, the worker and Redis, busy cores.
# Full JSON of every run goes to ${OUT:-/tmp/ws-pairs}/. Report medians and ratios, never one run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
out=${OUT:-/tmp/ws-pairs}
mkdir -p "$out"
# The CLI's module: `meetmesh` (python -m meetmesh); a tree from before the apps moved out of the
# library has only shared/bus/cli.py.
entry() { if [ -d "$1/meetmesh" ]; then echo meetmesh; else echo shared.bus.cli; fi; }
show='import json,sys;r=json.load(open(sys.argv[1]))["round_trip"];print(sys.argv[2],r["p50_ms"],r["p99_ms"],r["gateway_cpu_us_per_task"],r["worker_cpu_us_per_task"],r["redis_cpu_us_per_task"],r.get("machine_busy_cores"))'
for i in $(seq "${1:-5}"); do
  if [ -n "${2:-}" ]; then
    (cd "$2" && "$py" -m "$(entry "$2")" bench ws --json > "$out/before-$i.json" 2>/dev/null)
    "$py" -c "$show" "$out/before-$i.json" before
  fi
  (cd "$here" && "$py" -m meetmesh bench ws --json > "$out/this-$i.json" 2>/dev/null)
  "$py" -c "$show" "$out/this-$i.json" this
  (cd "$here" && "$py" bench/raw_ws_floor.py > "$out/floor-$i.json" 2>/dev/null)
  "$py" -c "$show" "$out/floor-$i.json" floor
done
