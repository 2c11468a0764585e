"""``embedding_bag``: what a mask does to the lookups an embedding table serves.

For every ``nn.Embedding`` / ``nn.EmbeddingBag`` among the data (and 2-D tensors when
``include_tensors``), a seeded sample of random bags goes through the dense table and the
masked table; the metrics are the cosine similarity between the two bag outputs, pooled over
all tables (``cosine_mean``, ``cosine_p05`` -- the 5th percentile, the bags hurt most) and per
table (``.../<name>``), and two forward-time ratios, sparse over dense (the fastest single
call of each over ``timing_repeats`` rounds of ~2 ms that take turns between them: the
estimate least hurt by other work on the machine; on one thread, so the ratio compares
kernels, not thread scheduling):

* ``forward_time_ratio``     -- the squashed table as the user gets it (the same dense
  layout, zeros stored): about 1.0; zeros alone do not make a bag faster.
* ``forward_time_ratio_csr`` -- the kept entries only, as a sparse CSR table driven by a
  sparse bag matrix (``torch.sparse.mm``): what a sparse kernel would buy or cost on this
  machine. Skipped for ``mode="max"``.

An ``nn.EmbeddingBag`` uses its own ``mode``; a plain ``nn.Embedding`` or tensor uses ``mode``.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sparsify_exp.runner.evaluation._util import weight_of
from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics

_MODES = ("sum", "mean", "max")


def _bags(num_rows: int, num_bags: int, bag_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_rows, (num_bags * bag_size,), generator=gen)
    offsets = torch.arange(0, num_bags * bag_size, bag_size)
    return indices, offsets


_ROUND_S = 2e-3  # one round times each forward back to back for about this long


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns, rounds: int) -> list[float]:
    """The fastest single call of each fn, over ``rounds`` rounds that take turns between them.

    The minimum of single calls is the estimate least hurt by other work on the machine, and
    taking turns exposes every fn to the same load. Timed on one thread: on a busy machine an
    intra-op thread that lost its core stalls a call for a whole scheduler tick (~10 ms, 400x a
    27 us bag forward), which swamps the kernels being compared.
    """
    fns = list(fns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no waiting on a descheduled intra-op thread: kernels compared
    try:
        for fn in fns:  # warm-up
            fn()
        estimate = [min(_timed(fn) for _ in range(3)) for fn in fns]
        calls = [max(1, min(256, math.ceil(_ROUND_S / max(t, 1e-7)))) for t in estimate]
        best = estimate[:]
        for _ in range(rounds):
            for j, fn in enumerate(fns):
                for _ in range(calls[j]):
                    best[j] = min(best[j], _timed(fn))
        return best
    finally:
        torch.set_num_threads(threads)


class EmbeddingBagEvaluator(Evaluator):
    """Cosine similarity of dense vs sparsified bag outputs, and forward-time ratios."""

    name = "embedding_bag"
    headline = ("cosine_mean",)

    def __init__(
        self,
        num_bags: int = 1024,
        bag_size: int = 16,
        mode: str = "mean",
        seed: int = 0,
        timing_repeats: int = 7,
        csr_timing: bool = True,
        include_tensors: bool = False,
        max_names: int | None = None,
    ) -> None:
        problems = []
        if num_bags < 1:
            problems.append(f"num_bags={num_bags}: must be >= 1")
        if bag_size < 1:
            problems.append(f"bag_size={bag_size}: must be >= 1")
        if mode not in _MODES:
            problems.append(f"mode={mode!r}: must be one of {', '.join(_MODES)}")
        if timing_repeats < 0:
            problems.append(f"timing_repeats={timing_repeats}: must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        self.num_bags = num_bags
        self.bag_size = bag_size
        self.mode = mode
        self.seed = seed
        self.timing_repeats = timing_repeats
        self.csr_timing = csr_timing
        self.include_tensors = include_tensors
        self.max_names = max_names

    def _tables(self, ctx: EvalContext) -> list[tuple[str, str]]:
        """``(name, mode)`` of every datum this evaluator can treat as a table."""
        tables = []
        for name in ctx.sparsifier.data_groups:
            data = ctx.named_data.get(name)
            if isinstance(data, nn.EmbeddingBag):
                tables.append((name, data.mode))
            elif isinstance(data, nn.Embedding) or (
                self.include_tensors and data is not None and weight_of(data).dim() == 2
            ):
                tables.append((name, self.mode))
        if not tables:
            kinds = sorted({type(d).__name__ for d in ctx.named_data.values()})
            raise ValueError(
                "embedding_bag: no nn.Embedding / nn.EmbeddingBag among the data "
                f"(found: {', '.join(kinds) or 'nothing'}); use it with data=embeddings, "
                "or set eval.embedding_bag.include_tensors=true to treat 2-D tensors as tables"
            )
        return tables

    @torch.no_grad()
    def on_masked(self, ctx: EvalContext) -> Metrics:
        sp = ctx.sparsifier
        metrics: Metrics = {}
        all_cos = []
        cos_mean: dict[str, float] = {}
        cos_p05: dict[str, float] = {}
        t_dense = t_sparse = t_csr = 0.0
        csr_ok = self.csr_timing and self.timing_repeats > 0
        for name, mode in self._tables(ctx):
            dense = sp.get_data(name, return_original=True).detach()
            mask = sp.get_mask(name).detach().to(device=dense.device, dtype=torch.bool)
            sparse = dense * mask
            indices, offsets = _bags(dense.shape[0], self.num_bags, self.bag_size, self.seed)
            indices, offsets = indices.to(dense.device), offsets.to(dense.device)

            def bag(weight, indices=indices, offsets=offsets, mode=mode):
                return F.embedding_bag(indices, weight, offsets, mode=mode)

            out_dense, out_sparse = bag(dense).double(), bag(sparse).double()
            cos = F.cosine_similarity(out_dense, out_sparse, dim=1, eps=1e-12)
            # a bag whose dense output is all zeros is unchanged by any mask
            both_zero = (out_dense.abs().sum(1) == 0) & (out_sparse.abs().sum(1) == 0)
            cos = torch.where(both_zero, torch.ones_like(cos), cos)
            all_cos.append(cos)
            cos_mean[name] = float(cos.mean())
            cos_p05[name] = float(torch.quantile(cos, 0.05))

            if self.timing_repeats > 0:
                csr = self._csr_forward(sparse, indices, offsets, mode) if csr_ok else None
                csr_ok = csr is not None
                times = time_interleaved(
                    [partial(bag, dense), partial(bag, sparse), *([csr] if csr else [])],
                    rounds=self.timing_repeats,
                )
                t_dense += times[0]
                t_sparse += times[1]
                t_csr += times[2] if csr else 0.0

        cos = torch.cat(all_cos)
        metrics[f"{self.name}/cosine_mean"] = float(cos.mean())
        metrics[f"{self.name}/cosine_p05"] = float(torch.quantile(cos, 0.05))
        metrics[f"{self.name}/cosine_min"] = float(cos.min())
        if self.timing_repeats > 0 and t_dense > 0:
            metrics[f"{self.name}/forward_time_ratio"] = t_sparse / t_dense
            if csr_ok:
                metrics[f"{self.name}/forward_time_ratio_csr"] = t_csr / t_dense
        metrics.update(self.per_name_metrics(ctx, "cosine_mean", cos_mean))
        metrics.update(self.per_name_metrics(ctx, "cosine_p05", cos_p05))
        return metrics

    def _csr_forward(self, sparse: torch.Tensor, indices, offsets, mode: str):
        """The bags through the kept entries as a CSR table (a closure), or None if unsupported."""
        if mode == "max":
            return None
        n_bags, n_rows = offsets.numel(), sparse.shape[0]
        values = torch.ones(indices.numel(), dtype=sparse.dtype, device=sparse.device)
        if mode == "mean":
            values /= self.bag_size
        crow = torch.arange(0, n_bags * self.bag_size + 1, self.bag_size, device=sparse.device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                bags = torch.sparse_csr_tensor(crow, indices, values, size=(n_bags, n_rows))
                table = sparse.to_sparse_csr()
                torch.sparse.mm(bags, table)
        except (RuntimeError, NotImplementedError):  # e.g. no CSR kernel for this dtype/device
            return None

        def forward():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse.mm(bags, table)

        return forward
