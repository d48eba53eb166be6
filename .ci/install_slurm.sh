#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, sbatch, ...) and munge for the `@pytest.mark.slurm` tests, if missing.
# Idempotent: does nothing when the binaries are already there. The test fixture (tests/slurm_cluster.py) writes a
# private slurm.conf and starts and stops the daemons itself; nothing here configures or starts a service.
# Never fails the caller: without apt-get (or when it cannot install) the slurm tests skip, saying why.
set -uo pipefail
missing=0
for bin in sbatch squeue scontrol sinfo scancel srun slurmctld slurmd munged; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing=1
done
if [ "$missing" -eq 0 ]; then
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
