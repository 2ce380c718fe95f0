#!/usr/bin/env bash
# The README's second command: set up with the test extras, then run the test suite.
# As root with apt-get it also installs the system tools the cluster tests use (shellcheck,
# Slurm, munge: scripts/ci_services.sh); elsewhere those tests are skipped with the reason.
# Extra arguments go to pytest (e.g. -m "not slow", -k equivalence).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test" bash scripts/setup_env.sh
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/ci_services.sh || echo "test.sh: could not install Slurm/shellcheck; their tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest -m "not gpu" "$@"
