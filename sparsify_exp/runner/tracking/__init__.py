"""Tracking a job in MLflow without losing a record: :mod:`.store` (the MLflow client, tags,
sweep look-ups), :mod:`.spool` (the on-disk record file), :mod:`.uploader` (spool -> store),
:mod:`.tracker` (what a job logs through), :mod:`.heartbeat` (runs whose process died),
:mod:`.reachability` (is the store there; which failures to retry), :mod:`.sync`
(``python -m sparsify_exp.sync``)."""
