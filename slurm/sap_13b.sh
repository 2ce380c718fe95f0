#!/bin/bash
# SAP fine-tuning, 13B: configs/sap_13b.yaml (Llama 2 13B chat, LoRA r=8 on q_proj/v_proj,
# fp32 adapters over a bf16 base, DeepSpeed ZeRO-3), sized for 1 node x 8 GPUs of 80 GB
# (8 GPUs, A100/H100 80GB). The memory plan, from
#   sap-dist plan --config configs/sap_13b.yaml --gpus 8 --gpu-memory 80
#   per-GPU memory, GiB           recommended
#     weights                                 3.03
#     gradients                               0.00
#     optimizer state                         0.01
#     SAP extra copy + probe                  0.00
#     gathered weights (transient)            1.18
#     activations                            36.85  (8 x 512 task, 4 x 256 safety)
#     optimizer step (transient)              0.00
#     reserve (CUDA, NCCL, fragmentation)     2.00
#     peak per GPU                           43.08
#     of                                     80.00
#   FITS: no offload, no checkpointing, 8 sequence(s) per GPU (43.1 of 80 GiB)
#
# Submit from any directory (the checkout must be on a filesystem every node sees; the log is
# <job name>-<job id>.out in the directory you submit from; relative paths in the variables and
# overrides below are relative to the checkout):
#   sbatch slurm/sap_13b.sh                                   # 1 node x 8 GPUs
#   sbatch --nodes=2 slurm/sap_13b.sh                         # node count from the command line
#   SAP_MODEL=/models/my-13b SAP_TASK_DATA=/data/task.jsonl sbatch slurm/sap_13b.sh
#   sbatch slurm/sap_13b.sh train.max_steps=500 sap.rho=0.02  # config overrides
# train.batch_size is global and must divide by the GPU count; the probe rows and safety pairs
# are rounded to it (the run says so). Check a command's config for its GPU count, no GPU needed:
#   sap-dist config --config configs/sap_13b.yaml --world-size 16 [overrides]
# Other GPU counts or memory sizes: re-run `sap-dist plan` with them. Every environment
# variable (model, data, output, backend, config, NCCL) and the preemption/requeue protocol are
# described in slurm/common.sh.
# GPU type: the plan is for 80 GB cards, but --gpus-per-node=8 below takes any 8 GPUs. Ask for
# the type by its name on your cluster (`sinfo -o "%P %G"` lists them, e.g. gpu:h100:8) on the
# command line, which wins over this header (same as --gres=gpu:h100:8):
#   sbatch --gpus-per-node=h100:8 slurm/sap_13b.sh
# or enable one of the two "##SBATCH" lines below (remove one "#"; a later line wins): the typed
# request, or a --constraint where the site tags nodes by feature (`sinfo -o "%N %f"`).
#SBATCH --job-name=sap-13b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
##SBATCH --gpus-per-node=h100:8
##SBATCH --constraint=h100
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
SAP_RECIPE=configs/sap_13b.yaml
# The checkout is the one this script lives in. Slurm runs a copy of it from its spool
# directory, so under sbatch its own path is the Command Slurm recorded for the job.
if [ -z "${SAP_ROOT:-}" ]; then
  sap_self=
  [ -n "${SLURM_JOB_ID:-}" ] && [ "${SAP_DRY_RUN:-0}" != 1 ] && sap_self=$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\).*/\1/p' || true)
  sap_self=${sap_self:-${BASH_SOURCE[0]}}
  case $sap_self in /*) ;; *) sap_self=${SLURM_SUBMIT_DIR:-$PWD}/$sap_self ;; esac
  SAP_ROOT=$(cd "$(dirname "$sap_self")/.." && pwd)
fi
# shellcheck source=slurm/common.sh
source "$SAP_ROOT/slurm/common.sh"
sap_run "$@"
