#!/bin/bash
# InternVL3-8B Mixed Preference Optimization on one node (8 GPUs): bash examples/mpo_8b.sh
# Recipe and layout: examples/configs/mpo_8b.yaml. Overridable: PREFERENCE_DATA (posttrain.data),
# INIT (posttrain.init: the SFT run), TOKENIZER, RUN_DIR, RESUME, GPUS_PER_NODE (see
# examples/launch_common.sh); arguments go to the trainer. Rerunning resumes.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRAINER_MODULE="${TRAINER_MODULE:-engine.posttrain.train}"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

# MPO variables: PREFERENCE_DATA (posttrain.data), INIT (posttrain.init).
mpo_args=()
if [[ -n "${PREFERENCE_DATA:-}" ]]; then mpo_args+=(--set "posttrain.data=$PREFERENCE_DATA"); fi
if [[ -n "${INIT:-}" ]]; then mpo_args+=(--set "posttrain.init=$INIT"); fi
launch_single_node examples/configs/mpo_8b.yaml "${mpo_args[@]}" "$@"
