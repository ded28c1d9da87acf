#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start-local-slurm.sh started, and only those: their PIDs are in
# /run/local-slurm/*.pid, and a PID is signalled only while it still runs the expected program.
# Nothing is ever stopped by name; the installed packages, configs and the job database stay.
#
#   sudo bash tests/slurm/stop-local-slurm.sh
set -uo pipefail

STATE_DIR=/run/local-slurm
[ "$(id -u)" -eq 0 ] || { echo "[local-slurm] must run as root (sudo bash $0)" >&2; exit 1; }

# cancel what is left in the queue first, so that no job step outlives its slurmd
if [ -s "$STATE_DIR/slurmctld.pid" ]; then
  jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null)
  [ -z "$jobs" ] || timeout 10 scancel $jobs
fi

# stop NAME: SIGTERM to the recorded PID, up to 30 s to exit (daemons take 1.5 to 3 s), then SIGKILL
stop() {
  local file="$STATE_DIR/$1.pid" pid i
  [ -s "$file" ] || return 0
  pid=$(tr -dc '0-9' <"$file")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
    echo "[local-slurm] stopping $1 (pid $pid)"
    kill "$pid"
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "[local-slurm] $1 did not exit, killing it"
      kill -9 "$pid"
    fi
  fi
  rm -f "$file"
}

# the compute node, the controller, accounting, its database, then authentication
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  stop "$daemon"
done
rmdir "$STATE_DIR" 2>/dev/null
exit 0
