#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/start_cluster.sh started: its slurmd, slurmctld,
# slurmdbd and MariaDB processes, found through their pid files. munged is left running
# (it is the machine's, and other SLURM users may need it).
#
#   bash tests/slurm/stop_cluster.sh           # stop; keep state, so job ids keep increasing
#   bash tests/slurm/stop_cluster.sh --wipe    # stop and delete $CELEBA_DIST_SLURM_DIR
set -euo pipefail

DIR="${CELEBA_DIST_SLURM_DIR:-/tmp/celeba-dist-slurm}"

stopped=0
# Nodes first, the database last: each daemon still reports to the one after it.
for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid" "$DIR/db/mariadbd.pid"; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
        stopped=$((stopped + 1))
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
done
echo "stop_cluster: stopped $stopped daemon(s)" >&2

if [[ "${1:-}" == "--wipe" ]]; then
    rm -rf "$DIR"
    echo "stop_cluster: removed $DIR" >&2
fi
