"""A small DLRM-style click model on seeded synthetic data, for the embedding-table study.

torch's data-sparsifier benchmark (``torch/ao/pruning/_experimental/data_sparsifier/
benchmarks``) prunes the embedding tables of a DLRM trained on Criteo and reports AUC, disk
size and forward time against sparsity. This is the same study with no download: a
synthetic click log whose sparse ids follow a power law (Zipf), so a few rows of each table
carry most of the traffic, as in real recommenders.

* **Data** (:func:`make_data`, seeded): ``n_dense`` Gaussian dense features and, per table, a
  bag of ``bag_sizes[t]`` ids drawn from ``Zipf(zipf_a)`` over ``cardinalities[t]`` rows
  (id 0 the most frequent). The click is a Bernoulli draw whose logit is a sum of pairwise
  dot products of hidden "true" vectors (one from the dense features, one per bag). Only the
  most frequent ``signal_fraction`` of each table's ids have a true vector, the long tail is
  noise: the label depends on the frequent ids, so a table that loses them loses AUC.
* **Model** (:class:`DLRM`): one ``nn.EmbeddingBag`` (sum) per sparse feature, a bottom MLP
  for the dense features, DLRM's dot-product interaction (every pair of the bottom output and
  the bags' vectors), then a top MLP to a click logit. Trained in its constructor (minibatch
  Adam, seeded shuffles, about 6 s on 2 cores) and cached in the temp dir keyed by every
  argument, so a sweep of many jobs trains once.
* **Score** (:func:`auc`): held-out ROC AUC (rank-based, ties averaged, in torch) and log loss.

::

    python -m sparsify_exp data=dlrm 'eval=[fidelity,dlrm_auc]' sparsifier.sparsity_level=0.9
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from sparsify_exp.runner.examples.cache import load_or_train

__all__ = ["DLRM", "auc", "calibration_batches", "load_data", "make_data", "roc_auc"]

_CACHE_VERSION = 1

# the synthetic click log (shared by the model's training and the evaluator)
CARDINALITIES = (1000, 500, 200)
BAG_SIZES = (1, 3, 1)
N_DENSE = 4
N_TRAIN = 20000
N_TEST = 8000
ZIPF_A = 1.1
TRUE_DIM = 4
SIGNAL_FRACTION = 0.1  # the most frequent 10% of each table's ids carry the signal
DATA_SEED = 1234

Batch = tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]


def _zipf_ids(gen: torch.Generator, n: int, cardinality: int, a: float) -> torch.Tensor:
    """``n`` ids in ``[0, cardinality)`` with P(id = k) proportional to ``(k + 1) ** -a``."""
    p = torch.arange(1, cardinality + 1, dtype=torch.float64).pow(-a)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def make_data(
    n: int,
    seed: int = DATA_SEED,
    cardinalities: tuple[int, ...] = CARDINALITIES,
    bag_sizes: tuple[int, ...] = BAG_SIZES,
    n_dense: int = N_DENSE,
    zipf_a: float = ZIPF_A,
    true_dim: int = TRUE_DIM,
    signal_fraction: float = SIGNAL_FRACTION,
    world_seed: int = DATA_SEED,
) -> Batch:
    """``(dense [n, n_dense], (ids_t [n, bag_sizes[t]] per table), clicks [n] in {0, 1})``.

    ``world_seed`` fixes the hidden true vectors (the same "world" for train and test);
    ``seed`` draws the samples.
    """
    world = torch.Generator().manual_seed(world_seed)
    true = [torch.randn(c, true_dim, generator=world) for c in cardinalities]
    for t in true:  # the long tail of rare ids is noise: no effect on the click
        t[max(1, round(signal_fraction * t.shape[0])) :] = 0
    w_dense = torch.randn(n_dense, true_dim, generator=world)

    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, n_dense, generator=gen)
    ids = tuple(
        _zipf_ids(gen, n * b, c, zipf_a).view(n, b)
        for c, b in zip(cardinalities, bag_sizes, strict=True)
    )
    vecs = [dense @ w_dense / n_dense**0.5] + [
        t[i].sum(1) / b**0.5 for t, i, b in zip(true, ids, bag_sizes, strict=True)
    ]
    logit = sum(
        (vecs[i] * vecs[j]).sum(1) for i in range(len(vecs)) for j in range(i + 1, len(vecs))
    )
    logit = 1.5 * logit / logit.std()
    clicks = torch.bernoulli(torch.sigmoid(logit), generator=gen)
    return dense, ids, clicks


@lru_cache(maxsize=2)
def load_data() -> tuple[Batch, Batch]:
    """``(train, test)`` of the shipped synthetic click log (test drawn with another seed)."""
    return make_data(N_TRAIN, seed=DATA_SEED), make_data(N_TEST, seed=DATA_SEED + 1)


def calibration_batches(
    batches: int = 20, batch_size: int = 512
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """``(dense, ids)`` inputs of :class:`DLRM` for ``calibration=batches``: the first
    ``batches * batch_size`` samples of the training split (traffic the model has served;
    the held-out split scored by :func:`auc` stays unseen)."""
    (dense, ids, _), _ = load_data()
    out = []
    for start in range(0, min(batches * batch_size, dense.shape[0]), batch_size):
        stop = start + batch_size
        out.append((dense[start:stop], tuple(i[start:stop] for i in ids)))
    return out


def _mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Embedding bags + bottom MLP + dot interaction + top MLP → click logit.

    Parameters are named ``embeddings.<t>.weight`` (the tables), ``bottom.*`` and ``top.*``.
    Trained on construction on :func:`load_data`'s training split (or loaded from cache).
    """

    def __init__(
        self,
        dim: int = 8,
        bottom: tuple[int, ...] = (32,),
        top: tuple[int, ...] = (64, 32),
        seed: int = 0,
        epochs: int = 5,
        batch_size: int = 512,
        lr: float = 0.01,
        weight_decay: float = 1e-3,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        bottom, top = list(bottom), list(top)
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(c, dim, mode="sum") for c in CARDINALITIES)
        self.bottom = _mlp([N_DENSE, *bottom, dim], last_relu=True)
        n_vec = len(CARDINALITIES) + 1
        n_pairs = n_vec * (n_vec - 1) // 2
        self.top = _mlp([dim + n_pairs, *top, 1], last_relu=False)
        rows, cols = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("_pairs", torch.stack([rows, cols]), persistent=False)

        world = (CARDINALITIES, BAG_SIZES, N_DENSE, N_TRAIN, ZIPF_A, TRUE_DIM, SIGNAL_FRACTION)
        key = (
            f"v{_CACHE_VERSION}-d{dim}-b{bottom}-t{top}-s{seed}-e{epochs}-bs{batch_size}-lr{lr}"
            f"-wd{weight_decay}-w{world}-x{DATA_SEED}"
        )
        load_or_train(
            self,
            "dlrm",
            key,
            lambda: self._train(seed, epochs, batch_size, lr, weight_decay),
            cache,
            cache_dir,
        )

    def _train(
        self, seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float
    ) -> None:
        (dense, ids, y), _ = load_data()
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            for emb in self.embeddings:
                # DLRM's init: U(-1/sqrt(n), 1/sqrt(n)); rows never seen stay near zero
                bound = emb.num_embeddings**-0.5
                nn.init.uniform_(emb.weight, -bound, bound)
            opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
            gen = torch.Generator().manual_seed(seed)
            self.train()
            for _ in range(epochs):  # seeded shuffles: deterministic
                for idx in torch.randperm(y.numel(), generator=gen).split(batch_size):
                    opt.zero_grad()
                    logits = self(dense[idx], tuple(i[idx] for i in ids))
                    loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
                    loss.backward()
                    opt.step()

    def forward(self, dense: torch.Tensor, ids: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Click logits ``[B]`` for dense features ``[B, n_dense]`` and one ``[B, bag]`` id
        tensor per table."""
        x = self.bottom(dense)
        vecs = torch.stack([x, *(emb(i) for emb, i in zip(self.embeddings, ids, strict=True))], 1)
        gram = vecs @ vecs.transpose(1, 2)  # [B, n_vec, n_vec]
        inter = gram[:, self._pairs[0], self._pairs[1]]
        return self.top(torch.cat([x, inter], 1)).squeeze(1)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC from ranks (Mann-Whitney U; tied scores get their average rank)."""
    scores = scores.detach().double().flatten()
    labels = labels.detach().flatten().bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def auc(model: nn.Module) -> dict[str, Any]:
    """Held-out AUC and log loss of a click model (the ``task`` evaluator's callable)."""
    _, (dense, ids, y) = load_data()
    was_training = model.training
    model.eval()
    logits = model(dense, ids)
    model.train(was_training)
    return {
        "auc": roc_auc(logits, y),
        "logloss": float(nn.functional.binary_cross_entropy_with_logits(logits, y)),
    }
