#!/bin/bash
# InternVL3-2B native multimodal pre-training on one node (8 GPUs): bash examples/pretrain_2b.sh
# Layout and its reasons: examples/configs/pretrain_2b.yaml. Overridable: DATA_META, TEXT_CORPUS,
# TOKENIZER, RUN_DIR, RESUME, GPUS_PER_NODE (see examples/launch_common.sh); arguments go to the
# trainer, e.g. bash examples/pretrain_2b.sh --set train.steps=1000. Rerunning resumes from the latest checkpoint.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch_common.sh
source "$here/launch_common.sh"

DATA_META="${DATA_META:-$ENGINE_DIR/data/pretrain/meta.json}"
launch_single_node examples/configs/pretrain_2b.yaml "$@"
