#!/usr/bin/env bash
# slurm_test_cluster.sh - a real one-node SLURM cluster for diffq-bench's SLURM tests
# (tests/launch/test_slurm.py), on a Debian/Ubuntu machine, as root, without systemd.
#
#   scripts/slurm_test_cluster.sh start    install the packages if needed, start the daemons, wait
#                                          until the node takes jobs (idempotent: a running cluster
#                                          is reused; the daemons restart if the config changed)
#   scripts/slurm_test_cluster.sh stop     cancel the jobs, stop the daemons this script started
#   scripts/slurm_test_cluster.sh bump     run until killed: a requeued job may start again 2 s
#                                          after its requeue instead of SLURM's 120 s hold
#   scripts/slurm_test_cluster.sh status   exit 0 when the controller answers
#
# What runs: munged (authentication), a private MariaDB on a unix socket + slurmdbd (accounting, so
# sacct and submitit see jobs that ended), slurmctld and slurmd, each started by hand and tracked by
# a pid file in the state folder (stop kills those pids only, never by name).
# Partitions: debug (default), low (preemptible, requeued with a signal when high needs the CPUs)
# and high. One node named "localhost" with every CPU and 90% of the memory.
#
# Knobs (environment): DIFFQ_SLURM_DIR state, logs and pid files (default: a folder under
# ${TMPDIR:-/tmp}); DIFFQ_SLURM_TIMEOUT seconds to wait for each daemon (default 60);
# DIFFQ_SLURM_PURGE=1 with stop: also delete the state folder.
set -euo pipefail

CMD=${1:-start}
STATE=${DIFFQ_SLURM_DIR:-${TMPDIR:-/tmp}/diffq-bench-slurm}
WAIT_S=${DIFFQ_SLURM_TIMEOUT:-60}
CONF_DIR=/etc/slurm
NODE=localhost
DB_SOCKET=$STATE/db/mysqld.sock
DB_PASSWORD=diffqbench     # a local database reachable through its unix socket only

say() { printf '[slurm-test-cluster %s] %s\n' "$(date +%T)" "$*"; }
fail() { say "error: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || fail "needs root (or password-less sudo)"
  exec sudo -n -E bash "$0" "$@"
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# ours NAME EXE: true when STATE/pids/NAME.pid names a live process whose command starts with EXE
ours() {
  local file=$STATE/pids/$1.pid pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [[ "$(cat "/proc/$pid/comm")" == "$2"* ]]
}
# poll WHAT CMD...: run CMD every 0.25 s until it succeeds, at most WAIT_S seconds
poll() {
  local what=$1; shift
  local deadline=$(( $(date +%s) + WAIT_S ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.25
  done
  say "$what is up"
}
has_pidfile() {
  local deadline=$(( $(date +%s) + WAIT_S ))
  until [ -s "$1" ]; do [ "$(date +%s)" -lt "$deadline" ] || return 1; sleep 0.1; done
}
stop_one() {  # stop_one NAME EXE
  local pid
  if ! ours "$1" "$2"; then rm -f "$STATE/pids/$1.pid"; return 0; fi
  pid=$(cat "$STATE/pids/$1.pid")
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$STATE/pids/$1.pid"
  say "stopped $1 (pid $pid)"
}

case "$CMD" in
  status)
    scontrol ping 2>/dev/null | grep -q UP; exit $? ;;
  bump)
    # SLURM keeps a requeued job pending for 120 s (Reason=BeginTime). Release such jobs once
    # 2 s have passed since the requeue (an immediate restart can be refused by slurmd).
    while true; do
      now=$(date +%s)
      squeue -h -t PD -o '%i %r %V %S' 2>/dev/null | while read -r id reason submitted begin; do
        [ "$reason" = BeginTime ] || continue
        s=$(date -d "$submitted" +%s 2>/dev/null) || continue
        b=$(date -d "$begin" +%s 2>/dev/null) || continue
        if [ $(( now - s )) -ge 2 ] && [ $(( b - now )) -gt 5 ]; then
          scontrol update JobId="$id" StartTime=now || true
        fi
      done
      sleep 1
    done ;;
  stop)
    if ours slurmctld slurmctld && [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
      scancel --full $(squeue -h -o %A) 2>/dev/null || true
      for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    stop_one slurmd slurmd; stop_one slurmctld slurmctld; stop_one slurmdbd slurmdbd
    stop_one mariadb mariadbd; stop_one munged munged
    [ "${DIFFQ_SLURM_PURGE:-0}" = 1 ] && rm -rf "$STATE"
    exit 0 ;;
  start) ;;
  *) fail "unknown command '$CMD' (start, stop, bump, status)" ;;
esac

# A controller that this script did not start already answers: use that cluster as it is (its
# config and daemons belong to whoever started it).
if ! ours slurmctld slurmctld && scontrol ping 2>/dev/null | grep -q UP; then
  say "a running cluster not started by this script answers: using it"
  sinfo
  exit 0
fi

# ------------------------------------------------------------------ packages
NEEDED=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=0
for exe in munged slurmctld slurmd sinfo slurmdbd mariadbd; do
  command -v "$exe" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  command -v apt-get >/dev/null 2>&1 || fail "SLURM is not installed and this is not a Debian/Ubuntu machine"
  say "installing ${NEEDED[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep the packages from starting their services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${NEEDED[@]}" >/dev/null
fi

# ------------------------------------------------------------------ configuration
mkdir -p "$STATE"/{ctld,spool,log,pids,db} "$CONF_DIR"
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo) * 90 / 100 ))
conf=$(mktemp)
cat > "$conf" <<EOF
# written by diffq-bench scripts/slurm_test_cluster.sh: a one-node test cluster
ClusterName=diffqtest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( MEM_MB / CPUS ))
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$STATE/pids/slurmctld.pid
SlurmdPidFile=$STATE/pids/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
changed=0
if ! cmp -s "$conf" "$CONF_DIR/slurm.conf"; then
  install -m 644 "$conf" "$CONF_DIR/slurm.conf"; changed=1
fi
cat > "$conf" <<EOF
# written by diffq-bench scripts/slurm_test_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/pids/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
if ! cmp -s "$conf" "$CONF_DIR/slurmdbd.conf"; then
  install -m 600 "$conf" "$CONF_DIR/slurmdbd.conf"; changed=1
fi
rm -f "$conf"
if [ "$changed" = 1 ]; then  # the daemons read their config at start-up
  stop_one slurmd slurmd; stop_one slurmctld slurmctld; stop_one slurmdbd slurmdbd
fi

# ------------------------------------------------------------------ munge
munge_works() { munge -n | unmunge >/dev/null; }
if ! munge_works 2>/dev/null; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged
  has_pidfile /run/munge/munged.pid || fail "munged did not start"
  cp /run/munge/munged.pid "$STATE/pids/munged.pid"
  poll munged munge_works || fail "munge does not work (see /var/log/munge/munged.log)"
fi

# ------------------------------------------------------------------ accounting database
db() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot "$@"; }
if ! ours mariadb mariadbd; then
  chown mysql:mysql "$STATE/db"
  if [ ! -d "$STATE/db/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/db/data" \
      --auth-root-authentication-method=socket --skip-test-db > "$STATE/log/db-install.log" 2>&1 \
      || fail "mariadb-install-db failed (see $STATE/log/db-install.log)"
  fi
  rm -f "$STATE/db/mariadb.pid"
  setsid nohup mariadbd --no-defaults --user=mysql --datadir="$STATE/db/data" --socket="$DB_SOCKET" \
    --pid-file="$STATE/db/mariadb.pid" --skip-networking --log-error="$STATE/log/mariadb.err" \
    --innodb-buffer-pool-size=128M </dev/null >/dev/null 2>&1 &
  has_pidfile "$STATE/db/mariadb.pid" || fail "mariadbd did not start (see $STATE/log/mariadb.err)"
  cp "$STATE/db/mariadb.pid" "$STATE/pids/mariadb.pid"
  poll mariadbd db -e 'select 1' || fail "mariadbd does not answer (see $STATE/log/mariadb.err)"
fi
db -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
if ! ours slurmdbd slurmdbd; then
  rm -f "$STATE/pids/slurmdbd.pid"
  MYSQL_UNIX_PORT="$DB_SOCKET" slurmdbd  # the client library finds the private socket this way
  has_pidfile "$STATE/pids/slurmdbd.pid" || fail "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
  poll slurmdbd sacctmgr -n -i list cluster || fail "slurmdbd does not answer (see $STATE/log/slurmdbd.log)"
fi

# ------------------------------------------------------------------ controller and node
if ! ours slurmctld slurmctld; then
  rm -f "$STATE/pids/slurmctld.pid"
  slurmctld
  has_pidfile "$STATE/pids/slurmctld.pid" || fail "slurmctld did not start (see $STATE/log/slurmctld.log)"
  poll slurmctld bash -c 'scontrol ping | grep -q UP' || fail "slurmctld does not answer (see $STATE/log/slurmctld.log)"
fi
node_started=""
if ! ours slurmd slurmd; then
  rm -f "$STATE/pids/slurmd.pid"
  node_started=$(date +%s)
  slurmd -N "$NODE"
  has_pidfile "$STATE/pids/slurmd.pid" || fail "slurmd did not start (see $STATE/log/slurmd.log)"
fi
# The controller remembers the node's state across restarts: wait for THIS slurmd to register.
registered() {
  [ -z "$node_started" ] && return 0
  local t
  t=$(scontrol -o show node "$NODE" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $(( node_started - 1 )) ]
}
deadline=$(( $(date +%s) + WAIT_S )); resumed=0
while :; do
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle|mixed|allocated) registered && break ;;
    *drain*|*down*|*inval*|*fail*)
      if [ "$resumed" = 0 ]; then scontrol update NodeName="$NODE" State=RESUME || true; resumed=1; fi ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || fail "node $NODE is not usable (state '$state'; see $STATE/log/slurmd.log)"
  sleep 0.25
done
say "node $NODE is $state: the cluster takes jobs"
