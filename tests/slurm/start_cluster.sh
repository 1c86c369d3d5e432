#!/usr/bin/env bash
# Start a real two-node SLURM cluster, with job accounting, on this one machine.
#
#   bash tests/slurm/start_cluster.sh          # as root; idempotent: a healthy cluster with the
#                                              # same configuration is left running as it is
#   bash tests/slurm/stop_cluster.sh [--wipe]  # stop the daemons this script started
#
# Needs the Debian packages slurmctld slurmd slurmdbd slurm-client munge mariadb-server
# (.ci/slurm.sh installs them, then runs this script).
#
# How clients find the cluster: everything lives under $CELEBA_DIST_SLURM_DIR (default
# /tmp/celeba-dist-slurm), and the client configuration is the file
#
#   /tmp/celeba-dist-slurm/slurm.conf     ->  export SLURM_CONF=/tmp/celeba-dist-slurm/slurm.conf
#
# (the pytest fixture `slurm_cluster` sets SLURM_CONF itself). Next to it:
#   slurmdbd.conf, state/ (controller state, kept across restarts so job ids keep increasing),
#   spool/n1 spool/n2, db/ (the accounting MariaDB), log/ (slurmctld.log, slurmd-n1.log, ...).
#
# The cluster: a controller, two slurmd daemons "n1" and "n2" on this host (distinct ports,
# NodeAddr=127.0.0.1, 2 CPUs each), one partition "debug", and slurmdbd over MariaDB so that
# `sacct` works as on a real site (submitit and `celeba-dist jobs` read job states from it).
# "n1" and "n2" are added to /etc/hosts so that a job's first node name works as MASTER_ADDR.
# All ports are away from SLURM's and MariaDB's defaults so a real installation is left alone.
set -euo pipefail

DIR="${CELEBA_DIST_SLURM_DIR:-/tmp/celeba-dist-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CLUSTER=celebadist
CTLD_PORT=16817
DBD_PORT=16820
DB_PORT=16821
NODES=(n1 n2)
NODE_PORTS=(16818 16819)

export SLURM_CONF="$CONF"

log() { echo "start_cluster: $*" >&2; }

if [[ $EUID -ne 0 ]]; then
    log "must run as root (slurmd starts jobs as their submitting user)"
    exit 1
fi
for tool in munged mariadbd slurmdbd slurmctld slurmd sinfo sacct; do
    command -v "$tool" >/dev/null || { log "$tool not found; run .ci/slurm.sh to install SLURM"; exit 1; }
done

# --- configuration (written to a scratch folder first, to see whether it changed) --------
NEW="$(mktemp -d)"
trap 'rm -rf "$NEW"' EXIT

cat >"$NEW/slurmdbd.conf" <<EOF
# Written by tests/slurm/start_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF

cat >"$NEW/slurm.conf" <<EOF
# Written by tests/slurm/start_cluster.sh: a two-node test cluster on one host.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=10
MpiDefault=none

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log

# Containers have no usable cgroups: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT

SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s and 30 s), so a requeued job starts soon after
# its begin time instead of at the next periodic pass.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2

# Requeueing allowed (preemption tests), a short grace between SIGTERM and SIGKILL, finished
# jobs leave the controller soon (sacct still has them).
JobRequeue=1
KillWait=5
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20

EOF
for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]}" \
        "CPUs=2 RealMemory=4000 State=UNKNOWN" >>"$NEW/slurm.conf"
done
echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$NEW/slurm.conf"

# --- helpers ----------------------------------------------------------------------------
pidfiles() {
    local node
    echo "$DIR/db/mariadbd.pid" "$DIR/slurmdbd.pid" "$DIR/slurmctld.pid"
    for node in "${NODES[@]}"; do echo "$DIR/slurmd-$node.pid"; done
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s
    local tries=$(($1 * 5))
    shift
    for _ in $(seq "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

cluster_up() {
    [[ -f "$CONF" ]] || return 1
    # Clients retry for ~20 s when no controller answers: look for live daemons first.
    local pidfile ready
    for pidfile in $(pidfiles); do
        [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null || return 1
    done
    ready="$(sinfo --noheader --Node --format='%N %t' 2>/dev/null \
        | awk '$2 ~ /^(idle|mix|alloc|comp)$/' | sort -u | wc -l)"
    [[ "$ready" -eq "${#NODES[@]}" ]]
}

if cmp -s "$NEW/slurm.conf" "$CONF" && cmp -s "$NEW/slurmdbd.conf" "$DIR/slurmdbd.conf" && cluster_up; then
    log "already running (SLURM_CONF=$CONF)"
    exit 0
fi

# --- munge: authenticates every SLURM message ------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged
    wait_for 10 bash -c 'munge -n | unmunge'
fi

# --- stop what an earlier start left running (unhealthy, or with another configuration) --
for pidfile in $(pidfiles); do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if kill "$pid" 2>/dev/null; then
        wait_for 10 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
done

mkdir -p "$DIR/state" "$DIR/log" "${NODES[@]/#/$DIR/spool/}"
chmod 0755 "$DIR"
install -m 0644 "$NEW/slurm.conf" "$CONF"
install -m 0600 "$NEW/slurmdbd.conf" "$DIR/slurmdbd.conf"  # slurmdbd insists: it holds a password
if ! grep -qE "^127\.0\.0\.1[[:space:]]+${NODES[0]} ${NODES[1]}\b" /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]}  # celeba-dist test SLURM cluster" >>/etc/hosts
fi

# --- accounting database ----------------------------------------------------------------
install -d -o mysql -g mysql -m 0750 "$DIR/db"
if [[ ! -d "$DIR/db/data/mysql" ]]; then
    runuser -u mysql -- mariadb-install-db --no-defaults --datadir="$DIR/db/data" \
        --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1
fi
# setsid: its own session, so the database outlives the shell that started it (slurm* daemonize)
setsid mariadbd --no-defaults --user=mysql --datadir="$DIR/db/data" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$DIR/db/mariadbd.sock" --pid-file="$DIR/db/mariadbd.pid" \
    --log-error="$DIR/db/mariadbd.log" --innodb-buffer-pool-size=32M 2>>"$DIR/db/mariadbd.log" &
disown
sql() { mariadb --no-defaults --socket="$DIR/db/mariadbd.sock" --user=root --execute="$1"; }
wait_for 30 sql "SELECT 1" || { log "MariaDB did not start:"; tail -n 20 "$DIR/db/mariadbd.log" >&2; exit 1; }
sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- SLURM daemons ----------------------------------------------------------------------
slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
wait_for 30 sacctmgr --noheader --parsable2 show cluster \
    || { log "slurmdbd did not start:"; tail -n 20 "$DIR/log/slurmdbd.log" >&2; exit 1; }
if [[ -z "$(sacctmgr --noheader --parsable2 show cluster "$CLUSTER" format=cluster)" ]]; then
    sacctmgr --immediate add cluster "$CLUSTER" >/dev/null
fi
slurmctld
wait_for 20 scontrol ping
for node in "${NODES[@]}"; do
    slurmd -N "$node"
done

wait_for 30 cluster_up || true
# The saved state can say "idle" before the slurmds answer: a two-node step proves they do.
if cluster_up && timeout 60 srun --nodes=2 --time=1 --job-name=start-cluster-check true; then
    log "up: $(sinfo --noheader --format='%P %D %t %N' | tr '\n' ' ')(SLURM_CONF=$CONF)"
    exit 0
fi
log "the cluster did not come up; sinfo says:"
sinfo >&2 || true
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
