"""``python -m sparsify_exp [group=option ...] [key=value ...]`` (``-m`` for a sweep)."""

from sparsify_exp import runner

if __name__ == "__main__":
    runner.start_prefetch()
    try:
        runner.main()
    except SystemExit as e:
        runner.fast_exit(e.code)
    runner.fast_exit(0)
