"""``python -m sparsify_exp [group=option ...] [key=value ...]`` (``-m`` for a sweep)."""

import threading


def _prefetch() -> None:
    # MLflow's import and its sqlite store modules take ~2 s; start them while Hydra composes
    # and validates the config on the main thread (I/O and C code overlap across threads).
    try:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        import mlflow.tracking  # noqa: F401
    except Exception:  # the main thread will report any real import problem
        pass


if __name__ == "__main__":
    threading.Thread(target=_prefetch, name="sparsify-prefetch", daemon=True).start()
    from sparsify_exp.runner import main

    main()
