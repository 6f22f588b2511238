#!/bin/bash
# InternVL3-8B Mixed Preference Optimization on one node (8 GPUs): bash examples/mpo_8b.sh
# Recipe and layout: examples/configs/mpo_8b.yaml. Overridable: PREFERENCE_DATA (posttrain.data),
# INIT (posttrain.init: the SFT run), TOKENIZER, RUN_DIR, RESUME, GPUS_PER_NODE (see
# examples/launch_common.sh); arguments go to the trainer. Rerunning resumes.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

# launch_common.sh launches engine.train; MPO runs the post-training entry point, with two more
# variables: PREFERENCE_DATA (posttrain.data) and INIT (posttrain.init).
eval "_common_$(declare -f trainer_args)"
trainer_args() {
    local config="$1"
    shift
    local extra=()
    if [[ -n "${PREFERENCE_DATA:-}" ]]; then extra+=(--set "posttrain.data=$PREFERENCE_DATA"); fi
    if [[ -n "${INIT:-}" ]]; then extra+=(--set "posttrain.init=$INIT"); fi
    _common_trainer_args "$config" "${extra[@]}" "$@"
    # shellcheck disable=SC2034  # read by launch_common.sh
    TRAINER_ARGS[1]=engine.posttrain.train
}

launch_single_node examples/configs/mpo_8b.yaml "$@"
