#!/usr/bin/env bash
# The README's first command: set up, then SAP-fine-tune the embedded SmolLM2-135M-Instruct on
# the bundled data (preset `quick`). Extra arguments are config overrides, e.g.
#   bash scripts/quickstart.sh train.max_steps=10 sap.variant=reference
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/sap-dist train --config quick "$@"
