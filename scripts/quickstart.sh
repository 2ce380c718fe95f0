#!/usr/bin/env bash
# The README's first command: set up, then run the side-by-side experiment on the embedded
# SmolLM2-135M-Instruct: align it (cached after the first run), fine-tune it on the bundled task
# with plain fine-tuning, SAP, Lisa and the KL safety anchor over 3 seeds, judge every run on the
# bundled and the independent (DoNotAnswer test half) harmful prompts, and write
# runs/experiment/{results.json,table.md,*.png}. Extra arguments go to `sap-dist experiment`, e.g.
#   bash scripts/quickstart.sh --seeds 0 --methods sft,sap_paper
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/sap-dist experiment --preset quick --out runs/experiment "$@"
