"""``eval=table``: the sparsity of whole tables when each process holds a shard of them.

In a sharded run every process logs its own MLflow run, whose ``sparsity/*`` metrics are of
its shard. This evaluator sums the kept and total entries of each table over the processes
(one all-reduce of two counts a name), so every process's run also holds the whole tables'
figures, ``table/sparsity`` and ``table/sparsity/<name>``. Without a process group it reports
this process's data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsify_exp.runner.evaluation._util import metric_key
from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics
from sparsify_exp.runner.tracking.keys import per_name_key

__all__ = ["TableEvaluator"]


class TableEvaluator(Evaluator):
    """``table/sparsity``, ``table/kept``, ``table/entries`` and ``table/processes`` over
    every process, and ``table/sparsity/<name>`` for the first ``max_names`` names."""

    name = "table"
    headline = ("sparsity",)

    def __init__(self, max_names: int = 20) -> None:
        self.max_names = max_names

    def on_masked(self, ctx: EvalContext) -> Metrics:
        sp = ctx.sparsifier
        names = list(ctx.named_data)
        counts = torch.tensor(
            [[int(sp.get_mask(n).count_nonzero()), sp.get_mask(n).numel()] for n in names],
            dtype=torch.int64,
        ).reshape(-1, 2)
        processes = 1
        if dist.is_initialized():
            group = getattr(sp, "process_group", None)
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            summed = counts.to(device)
            dist.all_reduce(summed, group=group)
            counts = summed.cpu()
            processes = dist.get_world_size(group)
        kept, entries = (int(v) for v in counts.sum(0)) if names else (0, 0)
        metrics: Metrics = {
            "table/sparsity": 1.0 - kept / max(entries, 1),
            "table/kept": float(kept),
            "table/entries": float(entries),
            "table/processes": float(processes),
        }
        for name, (k, n) in list(zip(names, counts.tolist(), strict=True))[: self.max_names]:
            metrics[per_name_key(metric_key(self.name, "sparsity"), name)] = 1.0 - k / max(n, 1)
        return metrics
