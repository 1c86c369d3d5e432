#!/usr/bin/env bash
# Install SLURM (with accounting) and start the two-node test cluster on this machine.
# Called by .ci/run before the tests; idempotent; needs root on Debian/Ubuntu.
#
# The tests find the cluster through a file, not through this shell's environment:
# tests/slurm/start_cluster.sh writes /tmp/celeba-dist-slurm/slurm.conf (or
# $CELEBA_DIST_SLURM_DIR/slurm.conf), and the `slurm_cluster` fixture in tests/conftest.py
# points SLURM_CONF at it. CI also sets CELEBA_DIST_REQUIRE_SLURM=1 so that a missing cluster
# fails the slurm tests instead of skipping them.
set -euo pipefail

cd "$(dirname "$0")/.."

# While this runs, $DIR/starting holds its pid, and at its end $DIR/start.rc its exit status: the
# `slurm_cluster` fixture waits for a start in progress (CI runs this beside the Python install).
DIR="${CELEBA_DIST_SLURM_DIR:-/tmp/celeba-dist-slurm}"
mkdir -p "$DIR"
rm -f "$DIR/start.rc"
echo $$ >"$DIR/starting"
trap 'echo $? >"$DIR/start.rc"; rm -f "$DIR/starting"' EXIT

packages=(munge slurmctld slurmd slurmdbd slurm-client mariadb-server mariadb-client)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query --show --showformat='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "slurm.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

bash tests/slurm/start_cluster.sh
