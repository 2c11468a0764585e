"""A job under ``torchrun`` (``data=sharded``): one MLflow run a process, told apart by tags.

Every process runs the whole job on its shard and logs its own run, named
``<run name>-rank<r>`` and tagged ``sparsify.shard.rank``, ``sparsify.shard.world_size`` and
``sparsify.shard.group`` (one id for the processes of a launch: filter on it to see them
together). Per-step ``sparsity/*`` metrics are of the process's shard; the ``table``
evaluator adds the whole tables' figures to every run.

Before any run starts, the process group is made and rank 0 alone creates the tracking
store and the experiment (a fresh sqlite store created by several processes at once
fails with "database is locked").
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import timedelta

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from sparsify_exp.runner.tracking import store as tr

log = logging.getLogger("sparsify_exp.runner")

SHARDED_SOURCE = "sparsify_exp.runner.data.sharded.build"
RANK_TAG = "sparsify.shard.rank"
WORLD_TAG = "sparsify.shard.world_size"
GROUP_TAG = "sparsify.shard.group"


def is_sharded(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "data._target_", default=None) == SHARDED_SOURCE


def prepare(cfg: DictConfig) -> None:
    """For a sharded job: the process group, the store and experiment made by rank 0 first,
    and this process's run name and tags in ``cfg.mlflow``. Other jobs: nothing."""
    if not is_sharded(cfg) or "RANK" not in os.environ:
        return  # not under torchrun: the data source says how to launch the job
    from sparsify_exp.sparsifier.sharded import init_process_group

    data = cfg.data
    backend = None if data.get("backend", "auto") == "auto" else str(data.backend)
    timeout_s = float(data.get("timeout_s", 300))
    init_process_group(backend, timeout_s=timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    group_id = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(group_id, src=0)
    if rank == 0:
        _create_experiment(cfg)
    _barrier(timeout_s, "the tracking store's set-up by rank 0")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    default = "-".join(str(v) for v in (choices.get("sparsifier"), choices.get("data")) if v)
    with open_dict(cfg):
        cfg.mlflow.run_name = f"{cfg.mlflow.run_name or default or 'sharded'}-rank{rank}"
        cfg.mlflow.tags[RANK_TAG] = str(rank)
        cfg.mlflow.tags[WORLD_TAG] = str(world)
        cfg.mlflow.tags[GROUP_TAG] = str(group_id[0])


def _create_experiment(cfg: DictConfig) -> None:

    launch = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else "."
    uri = tr.resolve_tracking_uri(cfg.mlflow.get("tracking_uri"), launch)
    try:
        tr.ensure_experiment(tr.open_client(uri), str(cfg.mlflow.experiment))
    except Exception as error:  # the run's own start reports an unreachable store
        log.warning("could not create the experiment before the shards start: %s", error)


def _barrier(timeout_s: float, what: str) -> None:
    from sparsify_exp.sparsifier.sharded import ShardError

    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ShardError(
            f"not all {dist.get_world_size()} processes joined within {timeout_s:g} s after "
            f"{what}: {first}"
        ) from None
