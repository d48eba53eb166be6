#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, sbatch, ...) and munge for the `@pytest.mark.slurm` tests, if missing.
# Idempotent: does nothing when the binaries are already on PATH. The test fixture (tests/slurm_cluster.py) writes
# a private slurm.conf and starts the daemons itself; nothing here configures or starts a service.
set -euo pipefail
need=()
for bin in sbatch squeue scontrol slurmctld slurmd; do command -v "$bin" >/dev/null 2>&1 || need+=(slurm-wlm); done
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -eq 0 ]; then
  echo "install_slurm: slurm and munge already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: apt-get not available; the slurm tests will be skipped" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }; then
  echo "install_slurm: apt-get could not install slurm-wlm munge; the slurm tests will be skipped" >&2
  exit 0
fi
echo "install_slurm: installed $(dpkg-query -W -f='${Package} ${Version} ' slurm-wlm munge 2>/dev/null)"
