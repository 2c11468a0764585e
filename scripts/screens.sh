#!/usr/bin/env bash
# See the sweep as a user does: run a small sweep into a fresh store, serve it with
# `mlflow server` on loopback, and save headless-Chromium screenshots of
#   runs_table.png  the sweep's children (its saved runs-table view: swept params, _summary/ columns)
#   parent_run.png  the parent run: the pick, the rule, the pick's _summary/ metrics, the swept params
#   child_run.png   the picked child: its _summary/ metrics first
#   child_charts.png the picked child's "Model metrics" charts: the _summary group first
# under outputs/screens/. Needs Debian's chromium (apt-get install chromium).
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

"$PY" -m mlflow server --backend-store-uri "$URI" --artifacts-destination "$STORE/artifacts" \
    --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done

read -r EXP PARENT CHILD < <("$PY" - "$URI" <<'PYEOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
parent = client.search_runs(["1"], "tags.`sparsify.sweep` = 'true'", max_results=1)[0]
print(parent.info.experiment_id, parent.info.run_id, parent.data.tags["sparsify.pick_run_id"])
PYEOF
)
BASE="http://127.0.0.1:$PORT/#/experiments/$EXP"
CLASSIC="workflowType=machine_learning"

shot() {  # shot NAME URL [HEIGHT]
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size="1800,${3:-1100}" \
        --run-all-compositor-stages-before-draw \
        --virtual-time-budget=30000 --screenshot="$OUT/$1.png" "$2" >/dev/null 2>&1
    echo "$OUT/$1.png  $2"
}
shot runs_table "$BASE/runs?viewStateShareKey=$PARENT&$CLASSIC"
shot parent_run "$BASE/runs/$PARENT?$CLASSIC" 1900
shot child_run "$BASE/runs/$CHILD?$CLASSIC" 1900
shot child_charts "$BASE/runs/$CHILD/model-metrics?$CLASSIC"
