"""``python -m sparsify_exp [group=option ...] [key=value ...]`` (``-m`` for a sweep)."""

from sparsify_exp.runner import main

if __name__ == "__main__":
    main()
