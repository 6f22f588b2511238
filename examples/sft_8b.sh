#!/bin/bash
# InternVL3-8B supervised fine-tuning on one node (8 GPUs): bash examples/sft_8b.sh
# Recipe and layout: examples/configs/sft_8b.yaml. Overridable: DATA_META, TOKENIZER, RUN_DIR, RESUME,
# GPUS_PER_NODE (see examples/launch_common.sh); arguments go to the trainer. Rerunning resumes.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

DATA_META="${DATA_META:-$ENGINE_DIR/data/sft/meta.json}"
launch_single_node examples/configs/sft_8b.yaml "$@"
