#!/usr/bin/env bash
# Block-shape x level sweep on embedding tables, judged by the embedding-bag evaluator (cosine
# of dense vs sparsified bag outputs, forward-time ratios) and fidelity. The parent run's
# report draws one line per block shape. Extra arguments go to the runner, e.g.
#   scripts/sweep_embeddings_blocks.sh hydra/launcher=joblib
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${EXPERIMENT:-embeddings_blocks}

"$PY" -m sparsify_exp -m \
  data=embeddings 'eval=[fidelity,embedding_bag]' \
  sparsifier=data_norm \
  'sparsifier.sparse_block_shape=[1,4],[1,16],[4,4]' \
  sparsifier.sparsity_level=0.3,0.5,0.7,0.9 \
  mlflow.experiment="$EXPERIMENT" "$@"

"$PY" -m sparsify_exp.report --experiment "$EXPERIMENT" \
  --out "outputs/reports/$EXPERIMENT" --no-log
