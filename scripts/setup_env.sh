#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install sap-dist into it.
#   bash scripts/setup_env.sh                 -> on a GPU node: pip install -e ".[cluster]"
#                                                (DeepSpeed: everything the slurm/ recipes use);
#                                                elsewhere: pip install -e .
#   EXTRAS=test bash scripts/setup_env.sh     -> pip install -e ".[test]"
# CPU machines (no nvidia-smi) get torch pinned by constraints/cpu.txt, because an unpinned
# torch pulls a multi-GB CUDA build; machines with a GPU keep whatever torch pip picks (or the
# one already installed), so set SAP_DIST_CPU=1 / 0 to force either choice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

cpu=${SAP_DIST_CPU:-}
if [ -z "$cpu" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cpu=0; else cpu=1; fi
fi
constraints=()
if [ "$cpu" = 1 ]; then
  constraints=(-c constraints/cpu.txt)
  # torch first, alone, so nothing else can pull a CUDA build in before the pin applies
  "${PIP[@]}" install "${constraints[@]}" torch
fi
# a GPU node is a cluster node: it gets what the recipes run (dist.backend=zero3 needs DeepSpeed)
[ "$cpu" = 0 ] && EXTRAS=${EXTRAS-cluster}
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
"${PIP[@]}" install ${constraints[@]+"${constraints[@]}"} -e "$spec"
echo "environment ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
