#!/bin/bash
# One launcher per node: srun (from slurm/common.sh) runs this once on every node of the
# allocation, so everything below is evaluated on that node: its node id, the GPUs and CPUs
# Slurm gave it, whether it hosts the rendezvous. It runs torchrun with a c10d rendezvous on
# the allocation's first node ($SAP_RDZV_ENDPOINT), which starts the node's training
# processes: `python -m sap_dist.train --config $SAP_CONFIG ARGS...`.
set -euo pipefail

nproc=${SAP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
node_id=${SLURM_NODEID:-0}
nnodes=${SLURM_JOB_NUM_NODES:-1}
# CPU threads per training process: the CPUs this launcher may really use (its affinity, which
# srun gave all of the job's CPUs on the node; at most what Slurm allocated on the node) split
# between its processes. --cpus-per-task is not it: on an exclusive node it leaves most CPUs
# idle, and the offload variants run the optimizer on the CPU.
cpus=$(nproc)
if [ -n "${SLURM_CPUS_ON_NODE:-}" ] && [ "$SLURM_CPUS_ON_NODE" -lt "$cpus" ]; then cpus=$SLURM_CPUS_ON_NODE; fi
threads=$((cpus / nproc))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
# Usual GPU-cluster settings (each overridable from the submitting shell):
# the caching allocator grows segments instead of fragmenting on varying sequence lengths;
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# a timed-out NCCL collective dumps every rank's recent collectives (the flight recorder) next
# to the run, which says which rank hung where (torch.distributed.flight_recorder reads them).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$SAP_OUTPUT_DIR/nccl_flight_recorder/rank_}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TORCH_FR_DUMP_TEMP_FILE}
log_dir=$SAP_OUTPUT_DIR/logs/node-$node_id
# The first node hosts the rendezvous store; the others connect to it.
is_host=false
[ "$node_id" = 0 ] && is_host=true

# Preemption: Slurm delivers SIGUSR1 (forwarded by the batch shell) and SIGTERM to every
# process of the job step, the training processes included. Those checkpoint at the next
# step boundary and exit; torchrun must outlive the signal meanwhile: it would die of
# SIGUSR1, and on a SIGTERM it handles itself it forwards it and SIGKILLs its workers 30 s
# later, whatever GraceTime is. So the launcher ignores both (the trainer installs its own
# handlers over the inherited "ignore") and torchrun is told not to handle SIGTERM with its
# own option (it overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from that option's default).
# Slurm's KillWait/GraceTime still bound how long a stop may take.
trap '' USR1 TERM
# A stopped run exits 0 after writing OUTPUT_DIR/.requeue (torchrun would turn the trainer's
# 75 into 1 and print a ChildFailedError traceback); slurm/common.sh requeues on that marker.
export SAP_PREEMPT_EXIT_CODE=0
python=${SAP_PYTHON:-python3}

# torchrun has --signals-to-handle from torch 2.9 on; older ones refuse it ("unrecognized
# arguments") and always handle SIGTERM themselves. Ask this torchrun's own --help rather than
# compare versions (its output whole, not piped into grep -q: an early exit there would kill
# torchrun with SIGPIPE and fail the pipeline under pipefail).
torchrun_signal_args() {
  local help
  help=$("$python" -m torch.distributed.run --help 2>/dev/null || true)
  case $help in
    *--signals-to-handle*) echo "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT" ;;  # not SIGTERM (see above)
  esac
}
signal_args=$(torchrun_signal_args)

cmd=("$python" -m torch.distributed.run
     --nnodes="$nnodes" --nproc-per-node="$nproc"
     --rdzv-backend=c10d --rdzv-endpoint="$SAP_RDZV_ENDPOINT"
     --rdzv-id="sap-${SLURM_JOB_ID:-0}-${SLURM_RESTART_COUNT:-0}" --rdzv-conf="is_host=$is_host"
     --max-restarts=0 ${signal_args:+"$signal_args"}
     --log-dir="$log_dir" --tee=3
     -m sap_dist.train --config "$SAP_CONFIG" "$@")

echo "node $node_id/$nnodes $(hostname): $nproc process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS, rendezvous host: $is_host, per-rank logs: $log_dir"
if [ -z "$signal_args" ]; then
  echo "node $node_id: this torchrun (torch < 2.9) has no --signals-to-handle: on a SIGTERM (scancel) it SIGKILLs the training processes 30 s later, which must checkpoint by then; the time-limit signal (SIGUSR1) is not affected"
fi
if [ "${SAP_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
mkdir -p "$log_dir" "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
exec "${cmd[@]}"
