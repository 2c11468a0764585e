"""``python -m sparsify_exp.materialize <job dir> [--format F] [--log]``: writes a finished
job's sparsified checkpoint from its saved masks (the code lives in
:mod:`sparsify_exp.runner.sweep.keep`)."""

import sys

from sparsify_exp.runner.sweep.keep import main

if __name__ == "__main__":
    sys.exit(main())
