#!/usr/bin/env bash
# System packages the cluster tests use (tests/test_slurm.py, tests/test_docker.py): the
# linter shellcheck, and Debian's Slurm (slurmctld, slurmd, slurm-client) with munge, from which
# the tests' fixture starts a one-host cluster of its own (loopback, private ports, a temp
# directory) and stops it afterwards. Nothing is started here. Idempotent: installs only
# what is missing, so a second run does nothing. Called by .ci/run; run it by hand (as root)
# to run those tests on your machine, where they are skipped while Slurm is missing.
set -euo pipefail

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

need=()
have shellcheck || need+=(shellcheck)
have slurmctld || need+=(slurmctld)
have slurmd || need+=(slurmd)
have sbatch || need+=(slurm-client)
have munged || need+=(munge)

if [ "${#need[@]}" -eq 0 ]; then
  echo "ci_services: shellcheck, slurm and munge already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_services: no apt-get here; install ${need[*]} with your package manager" >&2
  exit 1
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "ci_services: installing ${need[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
