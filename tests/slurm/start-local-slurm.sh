#!/usr/bin/env bash
# Start a single-node Slurm cluster on localhost, for tests/test_slurm.py (and by hand).
#
#   sudo bash tests/slurm/start-local-slurm.sh      # then: sudo bash tests/slurm/stop-local-slurm.sh
#
# Debian or Ubuntu, as root. Installs what is missing with apt-get (munge, slurmctld, slurmd,
# slurm-client, slurmdbd, mariadb-server; no recommends), writes /etc/slurm/slurm.conf and
# slurmdbd.conf, starts munged, MariaDB, slurmdbd, slurmctld and slurmd by hand (no systemd needed)
# and waits until the node is idle. Accounting through slurmdbd is not optional: the Snakemake Slurm
# executor polls job states with sacct, and without accounting it waits forever.
#
# Safe to run again: running daemons are kept unless their config changed. Every daemon this script
# starts has its PID recorded under /run/local-slurm/; stop-local-slurm.sh stops those and only those
# (daemons that were already running, e.g. started by systemd, are used and left alone).
#
# Environment (optional): LOCAL_SLURM_PARTITION (default debug), LOCAL_SLURM_ACCOUNT (default ci,
# created for root and $SUDO_USER), LOCAL_SLURM_WAIT (seconds to wait for the node, default 120).
set -euo pipefail

CLUSTER=localcluster
NODE=localhost
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
ACCOUNT=${LOCAL_SLURM_ACCOUNT:-ci}
WAIT=${LOCAL_SLURM_WAIT:-120}
STATE_DIR=/run/local-slurm
CONF=/etc/slurm/slurm.conf         # Slurm's compiled-in default: no SLURM_CONF needed, which the
DBDCONF=/etc/slurm/slurmdbd.conf   # executor would strip from the environment of a nested run anyway
DB_PASS=slurm-local-test           # a local test database reachable from localhost only
APT_LOG=/tmp/local-slurm-apt.log

log() { echo "[local-slurm] $*"; }
die() { log "ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (sudo bash $0)"

# ---------------------------------------------------------------- packages
# slurm-wlm itself would pull ~44 packages with its recommends (HDF5, ROCm, IPMI, ...); these are enough.
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=0
for program in munged slurmctld slurmd sbatch sacct slurmdbd mariadbd; do
  command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || missing=1
done
if [ "$missing" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  log "installing ${PACKAGES[*]} (log: $APT_LOG)"
  # a fresh machine may have no package lists yet: update and retry once
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$APT_LOG" 2>&1; then
    apt-get update -q >>"$APT_LOG" 2>&1
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$APT_LOG" 2>&1 \
      || { tail -20 "$APT_LOG" >&2; die "apt-get install failed"; }
  fi
fi

# ---------------------------------------------------------------- helpers
mkdir -p "$STATE_DIR"

# pid_alive PIDFILE COMM: the PID in PIDFILE runs a program named COMM (not a stale file, not a reused PID)
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# wait_for SECONDS COMMAND...: retry COMMAND every quarter second
wait_for() {
  local seconds=$1 i
  shift
  for ((i = 0; i < seconds * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  return 1
}

# started NAME PIDFILE COMM: wait for the daemon to write its PID file, then record it for the stop script
started() {
  wait_for 15 pid_alive "$2" "$3" || die "$1 did not start (see its log under /var/log)"
  echo "$(tr -dc '0-9' <"$2")" >"$STATE_DIR/$1.pid"
}

# stop_for_new_config NAME PIDFILE COMM: stop a running daemon so that it starts again with a new config
stop_for_new_config() {
  local pid
  pid_alive "$2" "$3" || return 0
  pid=$(tr -dc '0-9' <"$2")
  log "restarting $1 (new config)"
  kill "$pid"
  wait_for 30 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  rm -f "$STATE_DIR/$1.pid"
}

# install_if_changed NEW TARGET: move NEW over TARGET unless equal; true when TARGET changed
install_if_changed() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
  mv -f "$1" "$2"
}

# ---------------------------------------------------------------- directories
# /run is a tmpfs that systemd would populate (RuntimeDirectory=): create the runtime directories here.
# StateSaveLocation and the PID directory must belong to SlurmUser.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o slurm -g slurm -m 0755 /run/slurm /var/log/slurm /var/lib/slurm /var/lib/slurm/slurmctld
install -d -o root -g root -m 0755 /var/lib/slurm/slurmd /etc/slurm
install -d -o mysql -g mysql -m 0755 /run/mysqld

# ---------------------------------------------------------------- munge
# Debian's postinst creates the key; it must belong to munge and be private
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged   # as root it would need --force; it forks into the background
  started munged /run/munge/munged.pid munged
  munge -n | unmunge >/dev/null || die "munge round trip failed"
fi

# ---------------------------------------------------------------- MariaDB and slurmdbd
if ! mariadb-admin ping >/dev/null 2>&1; then
  # Debian's postinst initialises the data directory even where it cannot start the server
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  log "starting MariaDB"
  rm -f /run/mysqld/mysqld.pid
  setsid -f /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
    --innodb-lock-wait-timeout=900 </dev/null >>/var/log/local-slurm-mariadb.log 2>&1
  wait_for 30 mariadb-admin ping || die "MariaDB did not start (see /var/log/local-slurm-mariadb.log)"
  started mariadbd /run/mysqld/mysqld.pid mariadbd
fi
# root logs in through the unix socket: no password needed to create slurmdbd's user
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

new=$(mktemp)
cat >"$new" <<EOF
# written by tests/slurm/start-local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chown slurm:slurm "$new"
chmod 0600 "$new"   # slurmdbd refuses a config that others can read
install_if_changed "$new" "$DBDCONF" && stop_for_new_config slurmdbd /run/slurm/slurmdbd.pid slurmdbd
if ! pid_alive /run/slurm/slurmdbd.pid slurmdbd; then
  log "starting slurmdbd"
  /usr/sbin/slurmdbd
  started slurmdbd /run/slurm/slurmdbd.pid slurmdbd
fi

# ---------------------------------------------------------------- slurm.conf
CPUS=$(nproc)
# a node announcing more memory than slurmd detects is drained ("Low RealMemory"): take 85 %
MEMORY=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1) * 85 / 100 ))
new=$(mktemp)
cat >"$new" <<EOF
# written by tests/slurm/start-local-slurm.sh: one node, localhost only
ClusterName=$CLUSTER
# "localhost" names this machine whatever its hostname; slurmd is started with -N $NODE to match
SlurmctldHost=localhost(127.0.0.1)
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups: works in containers and VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# a node marked down (e.g. by a restart) comes back by itself
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# without it a job that names no memory is given the whole node's, and every other job waits
DefMemPerCPU=$(( MEMORY / CPUS < 1000 ? MEMORY / CPUS : 1000 ))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# keep sbatch --comment (the executor puts the rule name there)
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
Waittime=0
EOF
chmod 0644 "$new"
if install_if_changed "$new" "$CONF"; then
  log "wrote $CONF (CPUs=$CPUS RealMemory=$MEMORY)"
  # a changed accounting storage type needs a restart; reconfigure is not enough
  stop_for_new_config slurmd /run/slurm/slurmd.pid slurmd
  stop_for_new_config slurmctld /run/slurm/slurmctld.pid slurmctld
fi

# ---------------------------------------------------------------- accounts
# sacctmgr answers once slurmdbd is up and slurm.conf names accounting_storage/slurmdbd
wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer (see /var/log/slurm/slurmdbd.log)"
[ -n "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster)" ] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
[ -n "$(sacctmgr -n -P list account "$ACCOUNT" format=account)" ] \
  || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=tests >/dev/null
for user in root ${SUDO_USER:-}; do
  id "$user" >/dev/null 2>&1 || continue
  [ -n "$(sacctmgr -n -P list assoc cluster="$CLUSTER" user="$user" account="$ACCOUNT" format=user)" ] \
    || sacctmgr -i add user "$user" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
done

# ---------------------------------------------------------------- slurmctld and slurmd
if ! pid_alive /run/slurm/slurmctld.pid slurmctld; then
  log "starting slurmctld"
  /usr/sbin/slurmctld   # forks into the background (-D would keep it in the foreground)
  started slurmctld /run/slurm/slurmctld.pid slurmctld
fi
if ! pid_alive /run/slurm/slurmd.pid slurmd; then
  log "starting slurmd"
  /usr/sbin/slurmd -N "$NODE"
  started slurmd /run/slurm/slurmd.pid slurmd
fi

# ---------------------------------------------------------------- wait for the node
# right after a start the node is "unknown" for a moment; a drained or down node is resumed
state=""
for ((i = 0; i < WAIT * 2; i++)); do
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)
  case "$state" in
    idle | mix | alloc | comp) break ;;
    down* | drain* | drng* | fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle | mix | alloc | comp) ;;
  *) scontrol show node "$NODE" >&2 || true; die "node $NODE is not usable (state '$state')" ;;
esac
log "ready: Slurm $(sinfo -V | awk '{print $2}'), partition $PARTITION, account $ACCOUNT, node $NODE ($state)," \
  "$CPUS CPUs, ${MEMORY} MB"
