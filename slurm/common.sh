# shellcheck shell=bash
# What slurm/sap_7b.sh, sap_13b.sh and sap_70b.sh share: sourced by them on the batch host
# (the allocation's first node), it starts one launcher per node with srun (slurm/node.sh,
# which runs torchrun there with a c10d rendezvous on the first node), forwards the
# preemption signal to the training processes, and requeues the job when the run stopped
# for preemption after writing a checkpoint.
#
# Environment (all optional; sbatch passes the submitting shell's environment on):
#   SAP_ROOT            sap-dist checkout, on a filesystem every node sees (default: the one
#                       the submitted script is in, whatever directory sbatch ran from);
#                       the job runs in it, so relative paths below are relative to it
#   SAP_PYTHON          python with sap-dist installed (default: $SAP_ROOT/.venv/bin/python
#                       if it exists, else python3)
#   SAP_CONFIG          run config (default: the script's recipe in configs/)
#   SAP_MODEL           model.name_or_path (hub id, local directory, .gguf, ...)
#   SAP_TASK_DATA       data.task            SAP_SAFETY_DATA   data.safety
#   SAP_OUTPUT_DIR      train.output_dir (default: the one your own SAP_CONFIG sets, else
#                       runs/<job name>-<job id>; either is the same for a requeued job,
#                       which is how it finds its checkpoints)
#   SAP_BACKEND         dist.backend (zero3, zero2, zero3_offload, fsdp2, ddp)
#   SAP_DS_CONFIG       dist.deepspeed_config
#   SAP_EXTRA_ARGS      more overrides, split on spaces ("sap.rho=0.02 train.max_steps=500");
#                       arguments after the script name are overrides too:
#                       sbatch slurm/sap_70b.sh train.max_steps=500
#   SAP_NPROC_PER_NODE  training processes per node (default: the GPUs Slurm gave the node,
#                       $SLURM_GPUS_ON_NODE, else 1)
#   SAP_RDZV_PORT       c10d rendezvous port on the first node (default 20000 + job id % 10000)
#   SAP_RDZV_HOST       rendezvous address (default: the first node's NodeAddr in Slurm)
#   SAP_MAX_REQUEUES    give up requeueing after this many restarts (default 20)
#   SAP_SIGNAL_REPEAT   seconds between repeats of the forwarded stop signal while the run
#                       is still going (it may still be loading the model; default 60)
#   SAP_DRY_RUN=1       print the fetch-model, srun and torchrun command lines instead of
#                       running them
#   HF_HOME             Hugging Face cache, on a filesystem every node sees (default:
#                       $SAP_ROOT/.cache/huggingface, inside the checkout: set it to shared
#                       scratch, e.g. /scratch/$USER/hf, as the 70B weights alone are about
#                       140 GB); `sap-dist fetch-model` fills it once on the batch host with the
#                       model and the config's hub data sets, then the ranks run with
#                       HF_HUB_OFFLINE=1. Gated models need a token there: with HF_HOME already
#                       set, `hf auth login` writes it to $HF_HOME/token, where the job looks
#                       for it
#
# NCCL (set only where unset, so any of them can be overridden from the submitting shell):
#   NCCL_DEBUG=WARN                 INFO prints the transport and interfaces NCCL picked
#   NCCL_SOCKET_IFNAME=^docker0,lo  interfaces for NCCL's bootstrap/socket traffic: all but
#                                   these (set e.g. ib0 or eth0 to pin one)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=3  a failed or timed-out collective tears the process
#                                   down (and --kill-on-bad-exit the job) instead of hanging
#   Per-cluster, not set here: NCCL_IB_HCA (which InfiniBand HCAs/ports), NCCL_IB_DISABLE=1
#   (no InfiniBand: TCP sockets), NCCL_NET_GDR_LEVEL (GPUDirect RDMA), NCCL_P2P_DISABLE,
#   NCCL_CROSS_NIC. dist.timeout_minutes in the config bounds how long a collective waits.
#
# Preemption: the scripts ask for `--signal=B:USR1@600` and `--requeue`. Ten minutes before
# the time limit Slurm sends SIGUSR1 to this batch shell only; the trap below forwards it to
# every process of the job step (`scancel --signal=USR1`, which reaches the training
# processes themselves, not just the launchers, and is repeated every SAP_SIGNAL_REPEAT
# seconds until the step ends). sap-dist's trainer finishes its step, all ranks write one
# checkpoint at the same step boundary, write the marker $SAP_OUTPUT_DIR/.requeue (atomically)
# and exit 0 (node.sh sets SAP_PREEMPT_EXIT_CODE=0: torchrun would turn the trainer's 75 into
# 1 with a ChildFailedError traceback), leaving summary.json with status "preempted". This
# shell removes any old marker before it starts the step and, finding a new one after it,
# runs `scontrol requeue`; the requeued
# job (same job id, so the same output directory) starts with checkpoint.resume_from=auto
# and continues from the newest complete checkpoint. SIGTERM (scancel, or Slurm's own
# preemption with GraceTime) also reaches every process and makes the trainer checkpoint,
# but is never followed by a requeue from here: a cancel is a cancel, and Slurm requeues
# preempted jobs itself when PreemptMode=REQUEUE.

: "${NCCL_DEBUG:=WARN}"
: "${NCCL_SOCKET_IFNAME:=^docker0,lo}"
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=3}"
export NCCL_DEBUG NCCL_SOCKET_IFNAME TORCH_NCCL_ASYNC_ERROR_HANDLING

SAP_EXIT_REQUEUE=75

sap_log() {
  printf '[sap-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"
}

# Print the rendezvous address of the allocation's first node.
sap_head_address() {
  if [ -n "${SAP_RDZV_HOST:-}" ]; then
    echo "$SAP_RDZV_HOST"
    return
  fi
  local hosts head addr
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${hosts%%$'\n'*}
  [ -n "$head" ] || return 1
  addr=$(scontrol show node "$head" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  echo "${addr:-$head}"
}

# Status of the run in summary.json ("completed", "preempted", ...), for the log only.
sap_run_status() {
  local summary="$SAP_OUTPUT_DIR/summary.json"
  [ -f "$summary" ] || return 0
  "$SAP_PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status", ""))' "$summary" 2>/dev/null || true
}

sap_forward() {
  # $1: signal name. Every process of the job's steps (not this batch shell) receives it.
  scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || true
}

sap_on_usr1() {
  SAP_GOT_USR1=1
  sap_log "SIGUSR1 (time limit ahead or preemption notice): asking the training processes to checkpoint and stop"
  SAP_LAST_FORWARD=$(date +%s)
  sap_forward USR1
}

sap_on_term() {
  SAP_GOT_TERM=1
  sap_log "SIGTERM: the training processes got it too; waiting for their checkpoint (no requeue from here)"
}

# train.output_dir as the config file $1 sets it (nothing when it sets none).
sap_config_output_dir() {
  "$SAP_PYTHON" -c 'import sys, yaml
train = (yaml.safe_load(open(sys.argv[1])) or {}).get("train") or {}
print(train.get("output_dir") or "")' "$1" 2>/dev/null || true
}

# Usage: sap_run [override ...]  (from a sap_*.sh script that set SAP_RECIPE)
sap_run() {
  if [ -z "${SLURM_JOB_ID:-}" ] && [ "${SAP_DRY_RUN:-0}" != 1 ]; then
    echo "submit this script with sbatch (or set SAP_DRY_RUN=1 to print its commands)" >&2
    return 2
  fi
  SAP_ROOT=${SAP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  cd "$SAP_ROOT" || return 2
  if [ -z "${SAP_PYTHON:-}" ]; then
    if [ -x "$SAP_ROOT/.venv/bin/python" ]; then SAP_PYTHON=$SAP_ROOT/.venv/bin/python; else SAP_PYTHON=python3; fi
  fi
  SAP_CONFIG=${SAP_CONFIG:-$SAP_RECIPE}
  local job_id=${SLURM_JOB_ID:-0} job_name=${SLURM_JOB_NAME:-sap}
  # a user's own config keeps its output directory; the recipes' one directory per job keeps
  # two jobs of the same recipe apart
  if [ -z "${SAP_OUTPUT_DIR:-}" ] && [ "$SAP_CONFIG" != "$SAP_RECIPE" ]; then
    SAP_OUTPUT_DIR=$(sap_config_output_dir "$SAP_CONFIG")
  fi
  SAP_OUTPUT_DIR=${SAP_OUTPUT_DIR:-runs/$job_name-$job_id}
  SAP_RDZV_PORT=${SAP_RDZV_PORT:-$((20000 + job_id % 10000))}
  local nnodes=${SLURM_JOB_NUM_NODES:-1}

  local args=("train.output_dir=$SAP_OUTPUT_DIR")
  [ -n "${SAP_MODEL:-}" ] && args+=("model.name_or_path=$SAP_MODEL")
  [ -n "${SAP_TASK_DATA:-}" ] && args+=("data.task=$SAP_TASK_DATA")
  [ -n "${SAP_SAFETY_DATA:-}" ] && args+=("data.safety=$SAP_SAFETY_DATA")
  [ -n "${SAP_BACKEND:-}" ] && args+=("dist.backend=$SAP_BACKEND")
  [ -n "${SAP_DS_CONFIG:-}" ] && args+=("dist.deepspeed_config=$SAP_DS_CONFIG")
  local keys
  keys=$("$SAP_PYTHON" -m sap_dist.cli config 2>/dev/null || true)
  if grep -q '^  checkpoint\.resume_from ' <<<"$keys"; then
    args+=("checkpoint.resume_from=auto")
  else
    sap_log "warning: this sap-dist has no checkpoint.resume_from: a requeued job starts over"
  fi
  local extra=()
  if [ -n "${SAP_EXTRA_ARGS:-}" ]; then
    read -r -a extra <<<"$SAP_EXTRA_ARGS"
  fi
  # ${a[@]+"${a[@]}"}: an empty array under set -u is an error in bash < 4.4 (older clusters)
  args+=(${extra[@]+"${extra[@]}"} "$@")
  local arg previous=
  for arg in ${extra[@]+"${extra[@]}"} "$@"; do  # an output_dir given as an override is the one to watch
    case $previous in --train.output_dir) SAP_OUTPUT_DIR=$arg ;; esac
    case $arg in train.output_dir=* | --train.output_dir=*) SAP_OUTPUT_DIR=${arg#*=} ;; esac
    previous=$arg
  done

  if [ "${SAP_DRY_RUN:-0}" = 1 ]; then
    SAP_RDZV_ENDPOINT="${SAP_RDZV_HOST:-HEAD}:$SAP_RDZV_PORT"
  else
    local head_addr
    if ! head_addr=$(sap_head_address); then
      sap_log "cannot find the first node of $SLURM_JOB_NODELIST with scontrol; set SAP_RDZV_HOST"
      return 2
    fi
    SAP_RDZV_ENDPOINT="$head_addr:$SAP_RDZV_PORT"
  fi
  export SAP_ROOT SAP_PYTHON SAP_CONFIG SAP_OUTPUT_DIR SAP_RDZV_ENDPOINT

  local srun_cmd=(srun --kill-on-bad-exit=1 --label --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
  # The one launcher per node gets every CPU the job has there (the fewest over the nodes,
  # from e.g. "128(x2)"), not --cpus-per-task: node.sh splits them between its ranks.
  local node_cpus
  node_cpus=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-}" | sed 's/(.*//' | grep -E '^[0-9]+$' | sort -n | head -n 1 || true)
  [ -n "$node_cpus" ] && srun_cmd+=(--cpus-per-task="$node_cpus")
  srun_cmd+=(bash "$SAP_ROOT/slurm/node.sh" "${args[@]}")
  sap_log "job $job_id ($job_name), restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) ${SLURM_JOB_NODELIST:-}, rendezvous $SAP_RDZV_ENDPOINT"
  sap_log "config $SAP_CONFIG, output $SAP_OUTPUT_DIR, python $SAP_PYTHON"
  sap_log "overrides: ${args[*]}"
  # The model and the hub data sets, once, before any rank starts: downloaded into HF_HOME
  # (on the shared filesystem) unless already there; the ranks then run offline against it.
  # A missing model or data set ends the job here, before any GPU time is spent.
  # (sap_dist/tools/fetch.py)
  : "${HF_HOME:=$SAP_ROOT/.cache/huggingface}"
  export HF_HOME
  local fetch_cmd=("$SAP_PYTHON" -m sap_dist.cli fetch-model --config "$SAP_CONFIG" "${args[@]}")
  if [ "${SAP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${fetch_cmd[@]}"
    echo
  elif ! "${fetch_cmd[@]}"; then
    sap_log "the model or a data set is not available (see the line above): nothing started"
    return 2
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  if [ "${SAP_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${srun_cmd[@]}"
    echo
    SLURM_NODEID=0 SLURM_JOB_NUM_NODES=$nnodes SLURM_JOB_ID=$job_id bash "$SAP_ROOT/slurm/node.sh" "${args[@]}"
    return 0
  fi

  SAP_GOT_USR1=0
  SAP_GOT_TERM=0
  SAP_LAST_FORWARD=0
  trap sap_on_usr1 USR1
  trap sap_on_term TERM
  local rc pid rcfile marker="$SAP_OUTPUT_DIR/.requeue"
  # The trainer writes this marker (atomically, after its checkpoint) when it stopped on a
  # stop request; one left by an earlier attempt must not count.
  rm -f "$marker"
  rcfile=$(mktemp)
  # srun in the background, so that this shell can run its traps while the job step runs
  # (bash runs a trap only between commands; `wait` returns early for it). On a cancel Slurm
  # sends SIGTERM to this whole batch step too: the wrapper outlives it to record srun's status.
  ( trap '' TERM; r=0; "${srun_cmd[@]}" || r=$?; echo "$r" >"$rcfile" ) &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SAP_GOT_USR1" = 1 ]; then
      # repeat the stop request: the first may have come while the model was still loading
      if [ $(($(date +%s) - SAP_LAST_FORWARD)) -ge "${SAP_SIGNAL_REPEAT:-60}" ]; then
        SAP_LAST_FORWARD=$(date +%s)
        sap_forward USR1
      fi
      sleep 1
    else
      wait "$pid" || true
    fi
  done
  wait "$pid" 2>/dev/null || true
  rc=$(cat "$rcfile" 2>/dev/null || true)
  rc=${rc:-1}
  rm -f "$rcfile"
  trap - USR1 TERM
  local status
  status=$(sap_run_status)
  sap_log "training step exited with $rc; run status: ${status:-unknown}"
  if [ -f "$marker" ] || [ "$rc" = "$SAP_EXIT_REQUEUE" ]; then
    if [ "$SAP_GOT_TERM" = 1 ]; then
      sap_log "stopped by SIGTERM: checkpoint written, not requeueing (resubmit with SAP_OUTPUT_DIR=$SAP_OUTPUT_DIR to continue)"
      return "$SAP_EXIT_REQUEUE"
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${SAP_MAX_REQUEUES:-20}" ]; then
      sap_log "checkpoint written, but the job was already requeued ${SLURM_RESTART_COUNT} times (SAP_MAX_REQUEUES): not requeueing"
      return "$SAP_EXIT_REQUEUE"
    fi
    sap_log "checkpoint written: requeueing job $job_id; it resumes from the newest complete checkpoint"
    scontrol requeue "$job_id"
    return 0
  fi
  return "$rc"
}
