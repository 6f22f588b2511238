#!/bin/bash
# InternVL3-78B Mixed Preference Optimization on 32 nodes x 8 H100s: sbatch examples/mpo_78b.sh
# (submit from the repository root). Recipe and layout: examples/configs/mpo_78b.yaml.
# Overridable: PREFERENCE_DATA, INIT, TOKENIZER, RUN_DIR, RESUME (see examples/launch_common.sh); arguments go to the trainer. SIGUSR1 300 s before the time limit: save,
# requeue, resume from the latest checkpoint (the precomputed reference log-probs are kept).
#SBATCH --job-name=internvl3-78b-mpo
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$here/launch_common.sh" ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/examples"
TRAINER_MODULE="${TRAINER_MODULE:-engine.posttrain.train}"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

# MPO variables: PREFERENCE_DATA (posttrain.data), INIT (posttrain.init).
mpo_args=()
if [[ -n "${PREFERENCE_DATA:-}" ]]; then mpo_args+=(--set "posttrain.data=$PREFERENCE_DATA"); fi
if [[ -n "${INIT:-}" ]]; then mpo_args+=(--set "posttrain.init=$INIT"); fi
launch_slurm examples/configs/mpo_78b.yaml "${mpo_args[@]}" "$@"
