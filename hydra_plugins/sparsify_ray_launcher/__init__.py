"""``hydra/launcher=ray``: each job of a Hydra sweep runs as a Ray task, on a cluster started
with ``ray start`` (``address=host:port``) or on a Ray started for the sweep.

The project ships its own launcher instead of ``hydra-ray-launcher``: that plugin's last
release requires ``cloudpickle<3`` (for its AWS cluster part only), which conflicts with the
``joblib`` that Hydra's joblib launcher installs, and it always passes
``object_store_memory`` to ``ray.init``, which Ray refuses when connecting to a running
cluster. This one is the plugin's local launcher (``run_job`` in the worker, with the
driver's Hydra singletons), plus what a sweep here needs: each job starts in the
submitting command's folder and gets the driver's ``MLFLOW_*`` / ``SPARSIFY_EXP_*``
variables, so it logs to the same tracking store and finds its sweep's parent run.
"""
