#!/usr/bin/env bash
# Install the Debian packages the test suite needs (one-node Slurm with accounting, munge, chromium), as root.
# Idempotent: packages already installed are skipped; `apt-get update` runs at most once per call
# and only when something is missing. Usage: sudo scripts/ci-apt.sh [EXTRA_PACKAGE...]
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  slurmctld slurmd slurm-client munge   # a real one-node Slurm cluster (scripts/slurm-local.sh)
  slurmdbd mariadb-server               # its job accounting (sacct), stored in a private MariaDB
  chromium chromium-driver              # browser tests of the MLflow UI
  procps                                # pgrep/ps used by slurm-local.sh
  "$@"
)

if [ "$(id -u)" -ne 0 ]; then
  echo "ci-apt.sh: must run as root (apt-get install); current uid $(id -u)" >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [ "$status" = "installed" ]; then
    echo "ci-apt.sh: $pkg already installed"
  else
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "ci-apt.sh: nothing to install"
  exit 0
fi

echo "ci-apt.sh: installing ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}"
echo "ci-apt.sh: done"
