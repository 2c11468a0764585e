"""``python -m sparsify_exp.report``: rebuilds a sweep's report from the MLflow store (the
code lives in :mod:`sparsify_exp.runner.sweep.report`)."""

import sys

from sparsify_exp.runner.sweep.report import main

if __name__ == "__main__":
    sys.exit(main())
