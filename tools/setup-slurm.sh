#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (munged, MariaDB +
# slurmdbd for `sacct`, slurmctld, slurmd) for tests/slurm_e2e.rs and CI.
# Config templates: tools/slurm/. Idempotent: daemons already running are
# kept. Written for Debian (apt-get) without systemd: daemons start directly.
#
# Exit status: 0 the cluster is up (node idle), 3 Slurm cannot run here (the
# reason is printed; the test then skips), anything else a real failure.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
templates="$here/slurm"
etc=/etc/slurm
marker="managed-by: medreason-pipeline tools/setup-slurm.sh"

say() { echo "setup-slurm: $*" >&2; }
cannot() { say "cannot start Slurm: $*"; exit 3; }

cluster_up() {
  local state
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1) || return 1
  case "$state" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
  sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx medreason
}

# --- privileges ---------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  cannot "not root and no password-less sudo (daemons and /etc/slurm need root)"
fi
as_root() { "${SUDO[@]}" "$@"; }

# Fast path: our cluster is already up.
if command -v sinfo >/dev/null && [ -f "$etc/slurm.conf" ] && grep -q "$marker" "$etc/slurm.conf" && cluster_up; then
  say "cluster already running"
  exit 0
fi

# --- packages -------------------------------------------------------------------
need=()
for tool in sbatch:slurm-wlm slurmctld:slurm-wlm slurmd:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
  command -v "${tool%%:*}" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
export PATH="$PATH:/usr/sbin:/sbin"
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || cannot "missing ${need[*]} and no apt-get to install them"
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  say "installing ${need[*]} (apt-get)"
  as_root apt-get update -q >/dev/null || cannot "apt-get update failed"
  # The packages try to start their services through invoke-rc.d; without
  # systemd that fails harmlessly (we start the daemons below).
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || cannot "apt-get install ${need[*]} failed"
fi

# An existing cluster configuration that is not ours is never overwritten.
if [ -f "$etc/slurm.conf" ] && ! grep -q "$marker" "$etc/slurm.conf"; then
  if sinfo -h >/dev/null 2>&1; then
    say "using the existing cluster of $etc/slurm.conf"
    exit 0
  fi
  cannot "$etc/slurm.conf exists, was not written by this script and no cluster answers; not touching it"
fi

as_root mkdir -p "$etc" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld

install_conf() { # template destination mode -> prints "changed" when the file changed
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if ! as_root cmp -s "$tmp" "$1" 2>/dev/null; then
    as_root install -m "$2" "$tmp" "$1"
    echo changed
  fi
  rm -f "$tmp"
}

# --- munge --------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  say "creating the munge key"
  as_root mkdir -p /etc/munge
  as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
as_root chown -R munge:munge /etc/munge /run/munge
as_root chmod 0700 /etc/munge
as_root chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  say "starting munged"
  as_root runuser -u munge -- munged || as_root munged --force || cannot "munged does not start"
fi
for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || cannot "munge credentials do not round-trip (munged not working)"

# --- MariaDB + slurmdbd (accounting, for sacct) -------------------------------------
as_root chown mysql:mysql /run/mysqld
if ! as_root mariadb-admin ping >/dev/null 2>&1; then
  if [ ! -d /var/lib/mysql/mysql ]; then
    say "initialising the MariaDB data directory"
    as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null || cannot "mariadb-install-db failed"
  fi
  say "starting MariaDB"
  as_root setsid mariadbd --user=mysql --bind-address=127.0.0.1 >/var/log/slurm/mariadb.log 2>&1 < /dev/null &
  for _ in $(seq 100); do as_root mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
  as_root mariadb-admin ping >/dev/null 2>&1 || cannot "MariaDB does not start (see /var/log/slurm/mariadb.log)"
fi
db_pass=$(sed -n 's/^StoragePass=//p' "$templates/slurmdbd.conf")
as_root mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || cannot "cannot create the accounting database"


# --- slurm.conf from the template, with this machine's CPUs and memory ------------------
hw=$(slurmd -C | head -n1)
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[ -n "$cpus" ] && [ -n "$mem" ] || cannot "slurmd -C did not report CPUs and RealMemory: $hw"
mem=$(( mem > 2048 ? mem - 512 : mem ))  # leave room for the daemons
changed=$(sed -e "s/@CPUS@/$cpus/" -e "s/@MEMORY_MB@/$mem/" "$templates/slurm.conf.in" | install_conf "$etc/slurm.conf" 644)
changed+=$(install_conf "$etc/cgroup.conf" 644 < "$templates/cgroup.conf")
changed_dbd=$(install_conf "$etc/slurmdbd.conf" 600 < "$templates/slurmdbd.conf")
if [ -n "$changed_dbd" ] && pgrep -x slurmdbd >/dev/null; then as_root pkill -x slurmdbd || true; sleep 1; fi
if ! pgrep -x slurmdbd >/dev/null; then
  say "starting slurmdbd"
  as_root slurmdbd || cannot "slurmdbd does not start (see /var/log/slurm/slurmdbd.log)"
fi
for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n show cluster >/dev/null 2>&1 || cannot "slurmdbd does not answer (see /var/log/slurm/slurmdbd.log)"
if ! sacctmgr -n -P show cluster format=cluster | grep -qx medreason; then
  as_root sacctmgr -i add cluster medreason >/dev/null || cannot "cannot register the cluster with slurmdbd"
fi

if [ -n "$changed" ] && pgrep -x slurmctld >/dev/null; then
  say "configuration changed: restarting slurmctld and slurmd"
  as_root scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
fi
if ! pgrep -x slurmctld >/dev/null; then
  say "starting slurmctld"
  as_root slurmctld || cannot "slurmctld does not start (see /var/log/slurm/slurmctld.log)"
fi
if ! pgrep -x slurmd >/dev/null; then
  say "starting slurmd"
  as_root slurmd -N localhost || cannot "slurmd does not start (see /var/log/slurm/slurmd.log)"
fi

for _ in $(seq 120); do
  cluster_up && { say "cluster up: node localhost idle ($cpus CPUs, $mem MB), accounting on"; exit 0; }
  state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true)
  case "$state" in down*|drain*) as_root scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;; esac
  sleep 0.5
done
cannot "node localhost did not become idle (state: ${state:-none}; see /var/log/slurm/slurmd.log and slurmctld.log)"
