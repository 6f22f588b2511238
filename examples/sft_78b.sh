#!/bin/bash
# InternVL3-78B supervised fine-tuning on 32 nodes x 8 H100s: sbatch examples/sft_78b.sh
# (submit from the repository root). Recipe and layout: examples/configs/sft_78b.yaml.
# Overridable: DATA_META, TOKENIZER, RUN_DIR, RESUME (see examples/launch_common.sh); arguments go to
# the trainer. SIGUSR1 300 s before the time limit: save, requeue, resume from the latest checkpoint.
#SBATCH --job-name=internvl3-78b-sft
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
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

DATA_META="${DATA_META:-$ENGINE_DIR/data/sft/meta.json}"
launch_slurm examples/configs/sft_78b.yaml "$@"
