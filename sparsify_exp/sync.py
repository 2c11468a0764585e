"""``python -m sparsify_exp.sync <job dir>``: uploads what a job left in its spool to the
MLflow store (the code lives in :mod:`sparsify_exp.runner.tracking.sync`)."""

import sys

from sparsify_exp.runner.tracking.sync import main

if __name__ == "__main__":
    sys.exit(main())
