#!/usr/bin/env bash
# One-shot vs gradual pruning on the digits MLP (scikit-learn's bundled digits; no download).
# One sweep: every level x {one-shot (schedule=once), gradual (schedule=cubic, 10 steps)} x
# {no training, fine-tuning between steps (train=digits)}. The parent run's report plots one
# line per schedule/training pair against the sparsity reached. Extra arguments go to the
# runner, e.g.  scripts/sweep_digits_gradual.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${EXPERIMENT:-digits_gradual}

"$PY" -m sparsify_exp -m \
  data=digits_mlp 'eval=[fidelity,digits_accuracy]' \
  sparsifier=data_norm sparsifier.sparse_block_shape='[1,4]' \
  sparsifier.sparsity_level=0.5,0.8,0.9,0.95 \
  schedule=once,cubic train=none,digits \
  mlflow.mask_images=0 mlflow.experiment="$EXPERIMENT" "$@"

"$PY" -m sparsify_exp.report --experiment "$EXPERIMENT" \
  --out "outputs/reports/$EXPERIMENT" --no-log
