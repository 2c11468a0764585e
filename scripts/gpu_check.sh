#!/usr/bin/env bash
# The CUDA check: every test marked `cuda` (the library on CUDA tensors in fp32/fp16/bf16, 2:4
# through to_sparse_semi_structured with a matmul against the dense weight, a sharded table on
# nccl with one GPU, the streamed writer reading GPU memory), then the sparsifiers' steps on
# the CPU and on CUDA side by side (scripts/bench_data_sparsifier.py --only devices), and one
# summary table. About 3-5 minutes on one GPU; each part has its own time limit.
#
#   scripts/gpu_check.sh                 # from the repository root, on a machine with a GPU
#   GPU_CHECK_ROWS=1000000 scripts/gpu_check.sh   # a smaller table for the timings
#
# Set-up: a fresh virtualenv that sees the machine's own (CUDA) torch through
# --system-site-packages, with this package installed into it without dependencies. When
# something the tests import is missing there, it is installed from ./.whl (wheels carried to
# an offline machine) or else from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_CHECK_VENV:-$(mktemp -d)/venv}
ROWS=${GPU_CHECK_ROWS:-4000000}
OUT_DIR=${OUT:-$(mktemp -d)}
PY=${GPU_CHECK_PYTHON:-python3}

"$PY" -m venv --system-site-packages "$VENV"
V="$VENV/bin/python"
missing=$("$V" - <<'EOF'
import importlib.util
need = {"torch": "torch", "safetensors": "safetensors", "pytest": "pytest", "setuptools": "setuptools"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -d .whl ]; then
    "$V" -m pip install -q --no-index --find-links .whl $missing
  else
    "$V" -m pip install -q $missing
  fi
fi
"$V" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
"$V" - <<'EOF' || { echo "gpu_check: torch sees no CUDA device here; nothing to check"; exit 2; }
import os
import torch
if not torch.cuda.is_available():
    # GPU_CHECK_ALLOW_CPU=1 runs the script's plumbing on a CPU machine (every test skips)
    assert os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
    print(f"torch {torch.__version__}: no CUDA device (GPU_CHECK_ALLOW_CPU=1)")
else:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

set +e
timeout 420 "$V" -m pytest -m cuda -o addopts="" -p no:cacheprovider -q -rfE \
  --junitxml="$OUT_DIR/gpu_tests.xml" \
  tests/test_cuda.py tests/test_nm_sparsifier.py tests/test_sparsifier_base.py tests/test_sharded.py \
  2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 240 "$V" scripts/bench_data_sparsifier.py --only devices --rows "$ROWS" 2>&1 \
  | tee "$OUT_DIR/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

"$V" - "$OUT_DIR/gpu_tests.xml" "$OUT_DIR/gpu_bench.log" "$tests_rc" "$bench_rc" <<'EOF'
import collections, re, sys
import xml.etree.ElementTree as ET

xml_path, bench_path, tests_rc, bench_rc = sys.argv[1:]
groups = collections.OrderedDict()
try:
    cases = ET.parse(xml_path).getroot().iter("testcase")
except (OSError, ET.ParseError) as e:
    cases = []
    print(f"no test report ({e})")
for case in cases:
    name = re.sub(r"\[.*", "", case.get("name"))
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
    row = groups.setdefault(name, collections.Counter())
    row[outcome] += 1
    row["seconds"] += float(case.get("time") or 0)
print("\n== GPU check summary ==")
print(f"{'check':72s} {'passed':>6} {'failed':>6} {'skipped':>7} {'s':>6}")
for name, row in groups.items():
    failed = row["FAILED"] + row["ERROR"]
    print(f"{name[:72]:72s} {row['passed']:6d} {failed:6d} {row['skipped']:7d} {row['seconds']:6.1f}")
print(f"pytest exit {tests_rc}; bench exit {bench_rc}")
lines = open(bench_path).read().splitlines()
start = next((i for i, line in enumerate(lines) if line.startswith("== devices")), None)
print("\n".join(lines[start:] if start is not None else ["(no device timings)"]))
EOF
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
