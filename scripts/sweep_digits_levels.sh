#!/usr/bin/env bash
# Level sweep on the digits MLP (scikit-learn's bundled digits; no download): held-out accuracy
# falls as sparsity rises. One MLflow run a level under one parent run; the parent gets the
# sweep report (table + plots under report/). Extra arguments go to the runner, e.g.
#   scripts/sweep_digits_levels.sh hydra/launcher=joblib
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${EXPERIMENT:-digits_levels}

"$PY" -m sparsify_exp -m \
  data=digits_mlp 'eval=[fidelity,digits_accuracy]' \
  sparsifier=data_norm sparsifier.sparse_block_shape='[1,4]' \
  sparsifier.sparsity_level=0.1,0.3,0.5,0.7,0.8,0.9,0.95,0.99 \
  mlflow.experiment="$EXPERIMENT" "$@"

# the same report, rebuilt from the store into a local folder (what you would run after a
# cluster sweep), printed here
"$PY" -m sparsify_exp.report --experiment "$EXPERIMENT" \
  --out "outputs/reports/$EXPERIMENT" --no-log
