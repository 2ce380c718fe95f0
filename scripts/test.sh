#!/usr/bin/env bash
# The README's second command: set up with the test extras, then run the test suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k equivalence).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -m "not gpu" "$@"
