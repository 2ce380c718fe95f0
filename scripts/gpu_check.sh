#!/usr/bin/env bash
# GPU check for a machine with one CUDA GPU (the project's device machine, or a user's box):
#   1. equivalence on NCCL with world size 1: single vs zero3 vs fsdp2, fp32, both variants;
#   2. bf16 base + fp32 LoRA training through zero3 and fsdp2 (and single for comparison);
#   3. flash-attn 2 (bf16) through single and zero3, if flash_attn is installed.
# Each part prints one line PASS/FAIL/SKIP; the log of every run is kept under $OUT.
# Usage: bash scripts/gpu_check.sh            (OUT defaults to /tmp/sap_gpu_check)
# Needs torch with CUDA, transformers, peft, deepspeed; flash-attn optional. No network.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/sap_gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SAP_DIST_CACHE=${SAP_DIST_CACHE:-$OUT/cache}
export OMP_NUM_THREADS=4
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for m in ("transformers", "peft", "accelerate", "deepspeed", "flash_attn"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:  # report, do not stop: later parts say SKIP/FAIL
        print(m, "MISSING", type(exc).__name__, exc)
EOF
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { note "FAIL no CUDA device"; exit 1; }

# torchrun with one process: the distributed backends init NCCL with world size 1
train() {  # name backend overrides...
  local name=$1 backend=$2; shift 2
  local launcher=("$PY" -m torch.distributed.run --nproc_per_node 1 --master_port $((29500 + RANDOM % 1000)))
  [ "$backend" = single ] && launcher=("$PY")
  timeout 900 "${launcher[@]}" -m sap_dist.train --config tiny dist.backend="$backend" train.max_steps=3 \
    train.progress_bar=false train.output_dir="$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
}

# 1. equivalence, fp32
if timeout 1800 "$PY" -m sap_dist.tools.equivalence --backends single,zero3,fsdp2 --variants paper,reference \
    --steps 3 --nproc 1 --work-dir "$OUT/equivalence" --keep >"$OUT/equivalence.log" 2>&1; then
  note "PASS equivalence fp32 NCCL world 1 (single, zero3, fsdp2 x paper, reference)"
else
  note "FAIL equivalence (see $OUT/equivalence.log)"
fi
grep -A20 "^equivalence vs single" "$OUT/equivalence.log" | tee -a "$summary"

# 2. bf16 base weights, fp32 adapters
for b in single zero3 fsdp2; do
  if train "bf16-$b" "$b" model.dtype=bf16; then
    note "PASS bf16 $b: $(grep -h '"task_loss"' "$OUT/bf16-$b/metrics.jsonl" | tail -n1 | cut -c1-160)"
  else
    note "FAIL bf16 $b (see $OUT/bf16-$b.log): $(tail -n 3 "$OUT/bf16-$b.log" | tr '\n' ' ' | cut -c1-300)"
  fi
done
"$PY" - "$OUT" <<'EOF' | tee -a "$summary"
import json, sys, os
out = sys.argv[1]
rows = {}
for b in ("single", "zero3", "fsdp2"):
    path = os.path.join(out, f"bf16-{b}", "metrics.jsonl")
    if os.path.exists(path):
        rows[b] = [json.loads(l) for l in open(path)]
if "single" in rows:
    for b, r in rows.items():
        d = max(abs(x["task_loss"] - y["task_loss"]) for x, y in zip(r, rows["single"]))
        s = max(x.get("peak_memory_mb", 0) or 0 for x in r)
        print(f"bf16 {b}: max |task_loss - single| over steps = {d:.2e}; "
              f"perturb realized/intended (last) = {r[-1].get('perturb_norm_realized')}/{r[-1].get('perturb_norm_intended')}")
EOF

# 3. flash-attn 2
if "$PY" -c "import flash_attn" 2>/dev/null; then
  for b in single zero3; do
    if train "flash-$b" "$b" model.dtype=bf16 model.attn_implementation=flash_attention_2; then
      note "PASS flash_attention_2 $b"
    else
      note "FAIL flash_attention_2 $b (see $OUT/flash-$b.log): $(tail -n 3 "$OUT/flash-$b.log" | tr '\n' ' ' | cut -c1-300)"
    fi
  done
else
  note "SKIP flash_attention_2: flash_attn not installed"
fi

echo "----- summary ($summary)"
cat "$summary"
! grep -q '^FAIL' "$summary"
