#!/usr/bin/env bash
# See the sweeps as a user does: run two small sweeps into a fresh store, serve it with
# `mlflow server` on loopback, and save headless-Chromium screenshots under outputs/screens/:
#   runs_table.png      level x block sweep: its view's first screen (pick marked; swept
#                       settings, quality, sparsity, size columns)
#   tradeoff_charts.png the same view's charts: sparsity vs each quality headline, parallel
#                       coordinates over the swept keys and headlines
#   tradeoff_html.png   the parent's report/tradeoff.html: bounds drawn, the pick starred
#   parent_run.png      the parent run: the pick, the rule, the links, the pick's _summary/ metrics
#   child_run.png       the picked child: its _summary/ metrics first
#   child_charts.png    the picked child's "Model metrics" charts: the _summary group first
#   methods_table.png   a method comparison (3 methods x 2 levels) as one parent: its view
#   methods_charts.png  its charts
#   methods_html.png    its report/tradeoff.html
#   methods_parent.png  its parent run
# Needs Debian's chromium (apt-get install chromium).
#   bash scripts/screens.sh            # PORT=5077 OUT=outputs/screens to change where
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/screens}
PORT=${PORT:-5077}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -x "$PY" ] || make setup
[ -n "$CHROMIUM" ] || { echo "screens.sh: no chromium; install it: apt-get install chromium" >&2; exit 2; }

rm -rf "$OUT" && mkdir -p "$OUT"
STORE="$(cd "$OUT" && pwd)/store"
mkdir -p "$STORE"
URI="sqlite:///$STORE/mlflow.db"
(cd "$STORE" && "$OLDPWD/$PY" -m sparsify_exp -m sparsifier=data_norm data=embeddings \
    'eval=[fidelity,embedding_bag]' sparsifier.sparsity_level=0.2,0.5,0.8 \
    'sparsifier.sparse_block_shape=[1,1],[1,4]' mlflow.tracking_uri="$URI" \
    eval.embedding_bag.timing_repeats=0 output.progress=none) 2>&1 | tail -n 1
(cd "$STORE" && "$OLDPWD/$PY" -m sparsify_exp -m method=magnitude,data_norm_1x4,nm_2_4 \
    sparsifier.sparsity_level=0.5,0.7 data=embeddings 'eval=[fidelity,embedding_bag]' \
    mlflow.tracking_uri="$URI" eval.embedding_bag.timing_repeats=0 output.progress=none) 2>&1 |
    tail -n 1

"$PY" -m mlflow server --backend-store-uri "$URI" --artifacts-destination "$STORE/artifacts" \
    --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done

read -r EXP PARENT CHILD METHODS < <("$PY" - "$URI" "$OUT" <<'PYEOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
blocks, methods = client.search_runs(
    ["1"], "tags.`sparsify.sweep` = 'true'", order_by=["attributes.start_time ASC"]
)
for name, run in (("blocks", blocks), ("methods", methods)):  # the plotly pages, to shoot
    client.download_artifacts(run.info.run_id, "report/tradeoff.html", f"{sys.argv[2]}/{name}")
print(blocks.info.experiment_id, blocks.info.run_id, blocks.data.tags["sparsify.pick_run_id"],
      methods.info.run_id)
PYEOF
)
BASE="http://127.0.0.1:$PORT/#/experiments/$EXP"
CLASSIC="workflowType=machine_learning"

HTML="file://$(cd "$OUT" && pwd)"
VIEW="$BASE/runs?$CLASSIC&viewStateShareKey"
# one browser, the UI's assistant panel closed (scripts/shoot.py)
"$PY" scripts/shoot.py "$OUT" --chromium "$CHROMIUM" \
    runs_table "$VIEW=$PARENT" \
    tradeoff_charts "$VIEW=$PARENT&compareRunsMode=CHART" 1300 \
    tradeoff_html "$HTML/blocks/tradeoff.html" 1300 \
    parent_run "$BASE/runs/$PARENT?$CLASSIC" 1500 \
    child_run "$BASE/runs/$CHILD?$CLASSIC" 1900 \
    child_charts "$BASE/runs/$CHILD/model-metrics?$CLASSIC" \
    methods_table "$VIEW=$METHODS" \
    methods_charts "$VIEW=$METHODS&compareRunsMode=CHART" 1300 \
    methods_html "$HTML/methods/tradeoff.html" 1300 \
    methods_parent "$BASE/runs/$METHODS?$CLASSIC" 1500
