#!/bin/bash
# InternVL3-78B native multimodal pre-training on 32 nodes x 8 H100s: sbatch examples/pretrain_78b.sh
# (submit from the repository root). Layout and its reasons: examples/configs/pretrain_78b.yaml;
# check it with python -m engine.plan --config examples/configs/pretrain_78b.yaml --nodes 32 --gpus-per-node 8.
# Overridable: DATA_META, TEXT_CORPUS, TOKENIZER, RUN_DIR, RESUME (see examples/launch_common.sh);
# arguments go to the trainer, e.g. sbatch examples/pretrain_78b.sh --set train.steps=1000.
# 300 s before the time limit SLURM sends SIGUSR1: the trainers save and exit, the job requeues
# itself and resumes from RUN_DIR/checkpoints/latest.
#SBATCH --job-name=internvl3-78b-pretrain
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# sbatch runs a copy of this script; the sources stay where it was submitted.
[[ -f "$here/launch_common.sh" ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/examples"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

DATA_META="${DATA_META:-$ENGINE_DIR/data/pretrain/meta.json}"
launch_slurm examples/configs/pretrain_78b.yaml "$@"
