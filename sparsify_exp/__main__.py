"""``python -m sparsify_exp [group=option ...] [key=value ...]`` (``-m`` for a sweep)."""

from sparsify_exp import runner

if __name__ == "__main__":
    runner.start_prefetch()
    runner.main()
