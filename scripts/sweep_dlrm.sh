#!/usr/bin/env bash
# The DLRM study (torch's data-sparsifier benchmark design, no download): the embedding tables
# of a small DLRM-style click model (sparsify_exp.runner.examples.dlrm) pruned at levels
# 0.0-0.9 by 0.1 and 0.91-0.99 by 0.01, judged by held-out click AUC / log loss (dlrm_auc),
# disk size, and bag forward time (embedding_bag with timing_repeats).
# Two sweeps under one MLflow experiment, because sparse_block_shape and norm exist only on
# data_norm: (1) data_norm x block [1,1] / [1,4] x norm L1 / L2 x every level; (2) magnitude,
# row and random at a few levels. Each sweep's parent run gets its report (one line per
# block/norm, resp. per sparsifier); both are rebuilt locally at the end. Extra arguments go
# to both sweeps, e.g.
#   scripts/sweep_dlrm.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
# Another store: set MLFLOW_TRACKING_URI (the sweeps and the report both read it), not
# mlflow.tracking_uri=. LEVELS / FEW_LEVELS (comma lists) shrink the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${EXPERIMENT:-dlrm}
LEVELS=${LEVELS:-0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.91,0.92,0.93,0.94,0.95,0.96,0.97,0.98,0.99}
FEW_LEVELS=${FEW_LEVELS:-0.5,0.8,0.9,0.95,0.99}
COMMON=(
  data=dlrm 'eval=[fidelity,dlrm_auc,embedding_bag]'
  eval.embedding_bag.include_tensors=true eval.embedding_bag.timing_repeats=7
  mlflow.mask_images=0 mlflow.experiment="$EXPERIMENT"
)

# warm the model cache once, so parallel jobs never train it side by side
"$PY" -c 'from sparsify_exp.runner.examples.dlrm import DLRM, auc; print("dense", auc(DLRM()))'

"$PY" -m sparsify_exp -m "${COMMON[@]}" \
  sparsifier=data_norm 'sparsifier.sparse_block_shape=[1,1],[1,4]' sparsifier.norm=L1,L2 \
  sparsifier.sparsity_level="$LEVELS" "$@"

"$PY" -m sparsify_exp -m "${COMMON[@]}" \
  sparsifier=magnitude,row,random sparsifier.sparsity_level="$FEW_LEVELS" "$@"

"$PY" -m sparsify_exp.report --experiment "$EXPERIMENT" --all \
  --out "outputs/reports/$EXPERIMENT" --no-log
