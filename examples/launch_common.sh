# shellcheck shell=bash
# Launch logic shared by the example scripts (sourced, not run).
#
# Variables (environment, all optional):
#   RUN_DIR        run directory: metrics, checkpoints (resume from RUN_DIR/checkpoints/latest)
#   DATA_META      InternVL meta JSON of the training data (data.meta_path)
#   TEXT_CORPUS    language-only corpus (data.text_corpus); TOKENIZER: tokenizer directory (data.tokenizer)
#   RESUME         train.resume: auto (default: continue from the latest checkpoint), none, or a path
#   GPUS_PER_NODE  processes per node (default: SLURM_GPUS_ON_NODE, else the visible GPUs, else 8)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   TORCHRUN       torchrun executable (default: torchrun)
#   TRAINER_MODULE the Python module torchrun runs (default: engine.train)
#   PREFLIGHT=0    skip the preflight check (python -m engine.preflight, once per node before torchrun)
#   PYTHON         the Python that runs the preflight (default: python)
#   DRY_RUN=1      print the commands instead of running them
# Arguments given to a script are passed on to the trainer (e.g. --set train.steps=100).

ENGINE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCHRUN="${TORCHRUN:-torchrun}"
PYTHON="${PYTHON:-python}"
TRAINER_MODULE="${TRAINER_MODULE:-engine.train}"
MASTER_PORT="${MASTER_PORT:-29500}"
RESUME="${RESUME:-auto}"

# NCCL and PyTorch settings for multi-node H100 jobs (any can be overridden from the environment).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"          # tolerate transient InfiniBand stalls on large jobs
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed collective ends the job
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # less fragmentation
# Site specific, set when needed: NCCL_SOCKET_IFNAME, NCCL_IB_HCA.

gpus_per_node() {
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        echo "$GPUS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus | wc -l
    else
        echo 8
    fi
}

# trainer_args CONFIG [ARGS...]: the trainer's arguments, in the array TRAINER_ARGS
# (-m TRAINER_MODULE --config ... --set ...).
trainer_args() {
    local config="$1"
    shift
    local name
    name="$(basename "$config" .yaml)"
    TRAINER_ARGS=(-m "$TRAINER_MODULE" --config "$ENGINE_DIR/$config"
        --set "run.dir=${RUN_DIR:-$ENGINE_DIR/runs/$name}"
        --set "train.resume=$RESUME")
    if [[ -n "${DATA_META:-}" ]]; then TRAINER_ARGS+=(--set "data.meta_path=$DATA_META"); fi
    if [[ -n "${TEXT_CORPUS:-}" ]]; then TRAINER_ARGS+=(--set "data.text_corpus=$TEXT_CORPUS"); fi
    if [[ -n "${TOKENIZER:-}" ]]; then TRAINER_ARGS+=(--set "data.tokenizer=$TOKENIZER"); fi
    TRAINER_ARGS+=("$@")
}

# preflight_args NNODES: the preflight's command in the array PREFLIGHT_CMD (the trainer's config and
# overrides, this layout), or an empty array with PREFLIGHT=0. Call after trainer_args.
preflight_args() {
    PREFLIGHT_CMD=()
    if [[ "${PREFLIGHT:-1}" == 0 ]]; then return 0; fi
    PREFLIGHT_CMD=("$PYTHON" -m engine.preflight "${TRAINER_ARGS[@]:2}" --nodes "$1" --gpus-per-node "$(gpus_per_node)")
}

# show_or_run CMD...: print the command (DRY_RUN=1) or run it.
show_or_run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
        return 0
    fi
    "$@"
}

# launch_single_node CONFIG [ARGS...]: one torchrun on this machine, one process per GPU.
launch_single_node() {
    local config="$1"
    shift
    trainer_args "$config" "$@"
    preflight_args 1
    cd "$ENGINE_DIR" || return 1
    if ((${#PREFLIGHT_CMD[@]})); then show_or_run "${PREFLIGHT_CMD[@]}" || return 1; fi
    show_or_run "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$(gpus_per_node)" "${TRAINER_ARGS[@]}"
}

STOP_REQUESTED=0
on_usr1() {
    # SLURM's warning before the time limit: pass it to the trainers (through srun and torchrun),
    # which finish the step, save a checkpoint and exit; the job is requeued below.
    STOP_REQUESTED=1
    echo "$(date '+%F %T') SIGUSR1: asking the trainers to checkpoint and stop" >&2
    if [[ -n "${SRUN_PID:-}" ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}

# launch_slurm CONFIG [ARGS...]: inside an sbatch allocation, one torchrun per node through srun,
# rendezvous on the allocation's first node; requeue after a SIGUSR1 stop.
launch_slurm() {
    local config="$1"
    shift
    : "${SLURM_JOB_ID:?launch_slurm runs inside a SLURM job (sbatch)}"
    : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
    local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}"
    local head
    # head closing the pipe early may end scontrol with SIGPIPE (status 141 under pipefail).
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" || true
    if [[ -z "$head" ]]; then
        echo "no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
        return 1
    fi
    trainer_args "$config" "$@"
    preflight_args "$nnodes"
    cd "$ENGINE_DIR" || return 1
    local srun_args=(--nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    # every node checks itself before any GPU time is spent (exit 1 names each problem)
    if ((${#PREFLIGHT_CMD[@]})); then show_or_run srun "${srun_args[@]}" "${PREFLIGHT_CMD[@]}" || return 1; fi
    local cmd=(srun "${srun_args[@]}"
        "$TORCHRUN" --nnodes="$nnodes" --nproc-per-node="$(gpus_per_node)"
        --rdzv-backend=c10d --rdzv-endpoint="$head:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0
        "${TRAINER_ARGS[@]}")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        show_or_run "${cmd[@]}"
        return 0
    fi
    # torchrun forwards SIGUSR1 to its workers only when asked to, and gives them this long to save.
    export TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-280}"
    trap on_usr1 USR1
    "${cmd[@]}" &
    SRUN_PID=$!
    local status
    # wait returns early (status > 128) when a trapped signal arrives; wait again for srun itself.
    while true; do
        status=0
        wait "$SRUN_PID" || status=$?
        if ((status <= 128)) || ! kill -0 "$SRUN_PID" 2>/dev/null; then break; fi
    done
    trap - USR1
    if ((STOP_REQUESTED)); then
        echo "$(date '+%F %T') trainers stopped (exit $status): requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
