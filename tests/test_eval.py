"""Quality evaluators on real tensors, driven through the runner's hook order."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsify_exp import BaseDataSparsifier, DataNormSparsifier, FirstRowSparsifier
from sparsify_exp.runner.evaluation import (
    EmbeddingBagEvaluator,
    EvalContext,
    Evaluator,
    FidelityEvaluator,
    TaskEvaluator,
    resolve_callable,
)
from sparsify_exp.runner.evaluation import fidelity as fidelity_mod


class FixedMask(BaseDataSparsifier):
    """Applies a mask given per name in the config (``keep``)."""

    def update_mask(self, name, data, keep=None, **kwargs):
        if keep is not None:
            self.get_mask(name).copy_(keep)


def run_hooks(
    evaluators: list[Evaluator],
    sparsifier: BaseDataSparsifier,
    named_data: dict,
    tmp_path: Path,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """The runner's order: add_data, on_start, step, on_masked, squash_mask, on_end."""
    for name, data in named_data.items():
        sparsifier.add_data(name, data)
    ctx = EvalContext(
        named_data=named_data, sparsifier=sparsifier, model=model, artifacts_dir=tmp_path
    )
    metrics: dict[str, float] = {}
    for ev in evaluators:
        metrics.update(ev.on_start(ctx))
    sparsifier.step()
    for ev in evaluators:
        metrics.update(ev.on_masked(ctx))
    sparsifier.squash_mask()
    for ev in evaluators:
        metrics.update(ev.on_end(ctx))
    for key in metrics:
        assert key.split("/")[0] in {ev.name for ev in evaluators}, key
    return metrics


# ----------------------------------------------------------------------------- fidelity


def test_fidelity_of_known_mask_is_closed_form(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 5, generator=gen)
    b = torch.randn(7, generator=gen)
    dense_w, dense_b = w.clone(), b.clone()
    keep_w = torch.rand(8, 5, generator=gen) > 0.4
    keep_b = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    sp = FixedMask()
    sp.add_data("layer.0.weight", w, keep=keep_w)
    sp.add_data("layer.0.bias", b, keep=keep_b)
    m = run_hooks([FidelityEvaluator()], sp, {}, tmp_path)

    def closed(x, keep):
        return (x[~keep].norm() / x.norm()).item(), (x[keep].norm() ** 2 / x.norm() ** 2).item()

    for name, x, keep in (("layer.0.weight", dense_w, keep_w), ("layer.0.bias", dense_b, keep_b)):
        rel, kept = closed(x, keep)
        assert m[f"fidelity/rel_error/{name}"] == pytest.approx(rel, rel=1e-6)
        assert m[f"fidelity/energy_kept/{name}"] == pytest.approx(kept, rel=1e-6)
    removed = (dense_w[~keep_w].pow(2).sum() + dense_b[~keep_b].pow(2).sum()).item()
    total = (dense_w.pow(2).sum() + dense_b.pow(2).sum()).item()
    assert m["fidelity/rel_error"] == pytest.approx(math.sqrt(removed / total), rel=1e-6)
    assert m["fidelity/energy_kept"] == pytest.approx(1 - removed / total, rel=1e-6)
    assert m["fidelity/rel_error_max"] == pytest.approx(
        max(closed(dense_w, keep_w)[0], closed(dense_b, keep_b)[0]), rel=1e-6
    )
    # the squash really applied that mask: the evaluator judged the mask the user got
    assert torch.equal(w, dense_w * keep_w)

    with open(tmp_path / "fidelity.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["layer.0.weight", "layer.0.bias"]
    assert float(rows[1]["energy_kept"]) == pytest.approx(closed(dense_b, keep_b)[1], rel=1e-6)


def test_fidelity_first_row_and_levels(tmp_path):
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    expected = (w[0].norm() / w.norm()).item()
    m = run_hooks([FidelityEvaluator()], FirstRowSparsifier(), {"w": w}, tmp_path)
    assert m["fidelity/rel_error"] == pytest.approx(expected, rel=1e-6)

    def at(level):
        data = {"w": torch.randn(32, 32, generator=torch.Generator().manual_seed(2))}
        sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
        return run_hooks([FidelityEvaluator(write_table=False)], sp, data, tmp_path)

    none, half, all_ = at(0.0), at(0.5), at(1.0)
    assert none["fidelity/rel_error"] == 0.0 and none["fidelity/energy_kept"] == 1.0
    assert 0.0 < half["fidelity/rel_error"] < 1.0
    # lowest-norm blocks go first: half the blocks hold well under half the energy
    assert half["fidelity/energy_kept"] > 0.5
    assert all_["fidelity/rel_error"] == pytest.approx(1.0) and all_["fidelity/energy_kept"] == 0


def test_fidelity_limits_per_name_metrics_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_mod, "_CHUNK_ENTRIES", 7)  # many chunks, odd boundaries
    gen = torch.Generator().manual_seed(3)
    data = {f"t{i}": torch.randn(9, 6, generator=gen) for i in range(5)}
    dense = {k: v.clone() for k, v in data.items()}
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    m = run_hooks([FidelityEvaluator(max_names=2)], sp, data, tmp_path)
    per_name = [k for k in m if k.startswith("fidelity/rel_error/")]
    assert per_name == ["fidelity/rel_error/t0", "fidelity/rel_error/t1"]
    removed = sum((dense[k] - data[k]).pow(2).sum().item() for k in data)  # squashed = masked
    total = sum(v.pow(2).sum().item() for v in dense.values())
    assert m["fidelity/rel_error"] == pytest.approx(math.sqrt(removed / total), rel=1e-6)
    with open(tmp_path / "fidelity.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5  # the table keeps every name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fidelity_any_dtype_and_data_untouched(tmp_path, dtype):
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    dense = w.clone()
    m = run_hooks([FidelityEvaluator()], FirstRowSparsifier(), {"w": w}, tmp_path)
    d = dense.double()
    assert m["fidelity/rel_error"] == pytest.approx((d[0].norm() / d.norm()).item(), 1e-9)
    # the evaluator only read the data: the squashed tensor is the dense one minus row 0
    assert torch.equal(w[1:], dense[1:]) and not w[0].any()


# ----------------------------------------------------------------------------- embedding bag


def _tables(seed=0):
    torch.manual_seed(seed)
    return {
        "user.table": nn.EmbeddingBag(500, 16, mode="sum"),
        "item.table": nn.Embedding(300, 16),
    }


def _bag_metrics(level, tmp_path, **kwargs):
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
    ev = EmbeddingBagEvaluator(num_bags=256, bag_size=8, timing_repeats=3, **kwargs)
    return run_hooks([ev], sp, _tables(), tmp_path)


def test_embedding_bag_cosine_is_one_at_level_zero(tmp_path):
    threads = torch.get_num_threads()
    m = _bag_metrics(0.0, tmp_path)
    assert torch.get_num_threads() == threads  # timing on one thread restores the setting
    for key in ("cosine_mean", "cosine_p05", "cosine_min"):
        assert m[f"embedding_bag/{key}"] == pytest.approx(1.0, abs=1e-6)
    assert m["embedding_bag/cosine_mean/user.table"] == pytest.approx(1.0, abs=1e-6)
    assert m["embedding_bag/cosine_mean/item.table"] == pytest.approx(1.0, abs=1e-6)
    for key in ("forward_time_ratio", "forward_time_ratio_csr"):
        assert math.isfinite(m[f"embedding_bag/{key}"]) and m[f"embedding_bag/{key}"] > 0


def test_embedding_bag_cosine_drops_as_level_rises(tmp_path):
    means = [_bag_metrics(lv, tmp_path)["embedding_bag/cosine_mean"] for lv in (0.2, 0.5, 0.9)]
    p05 = [_bag_metrics(lv, tmp_path)["embedding_bag/cosine_p05"] for lv in (0.2, 0.5, 0.9)]
    assert 1.0 > means[0] > means[1] > means[2] > 0.0
    assert 1.0 > p05[0] > p05[1] > p05[2]
    assert all(p <= mu for p, mu in zip(p05, means, strict=True))  # p05 is the low tail


def test_embedding_bag_matches_direct_computation(tmp_path):
    """The pooled cosine equals the one computed by hand from the squashed tables."""
    tables = _tables()
    dense = {k: t.weight.detach().clone() for k, t in tables.items()}
    sp = DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4))
    ev = EmbeddingBagEvaluator(num_bags=64, bag_size=4, seed=7, timing_repeats=0)
    m = run_hooks([ev], sp, tables, tmp_path)
    cos = []
    for name, table in tables.items():
        gen = torch.Generator().manual_seed(7)
        idx = torch.randint(0, dense[name].shape[0], (64 * 4,), generator=gen)
        off = torch.arange(0, 64 * 4, 4)
        mode = table.mode if isinstance(table, nn.EmbeddingBag) else "mean"
        a = nn.functional.embedding_bag(idx, dense[name], off, mode=mode)
        b = nn.functional.embedding_bag(idx, table.weight.detach(), off, mode=mode)
        cos.append(nn.functional.cosine_similarity(a.double(), b.double(), dim=1))
    assert m["embedding_bag/cosine_mean"] == pytest.approx(torch.cat(cos).mean().item(), 1e-9)
    assert "embedding_bag/forward_time_ratio" not in m  # timing_repeats=0 skips timing


def test_embedding_bag_all_zero_is_cosine_zero_and_max_mode_skips_csr(tmp_path):
    torch.manual_seed(0)
    tables = {"t": nn.EmbeddingBag(50, 8, mode="max")}
    sp = FixedMask()
    sp.add_data("t", tables["t"], keep=torch.zeros(50, 8, dtype=torch.bool))
    ev = EmbeddingBagEvaluator(num_bags=32, bag_size=4, timing_repeats=2)
    ctx = EvalContext(named_data=tables, sparsifier=sp, artifacts_dir=tmp_path)
    sp.step()
    m = ev.on_masked(ctx)
    assert m["embedding_bag/cosine_mean"] == pytest.approx(0.0, abs=1e-9)
    assert "embedding_bag/forward_time_ratio" in m
    assert "embedding_bag/forward_time_ratio_csr" not in m


def test_embedding_bag_needs_tables(tmp_path):
    data = {"w": torch.randn(40, 8)}
    sp = DataNormSparsifier(sparsity_level=0.5)
    with pytest.raises(ValueError, match="data=embeddings"):
        run_hooks([EmbeddingBagEvaluator(timing_repeats=0)], sp, data, tmp_path)
    data = {"w": torch.randn(40, 8)}
    sp = DataNormSparsifier(sparsity_level=0.5)
    ev = EmbeddingBagEvaluator(timing_repeats=0, include_tensors=True, num_bags=16)
    m = run_hooks([ev], sp, data, tmp_path)
    assert 0.0 < m["embedding_bag/cosine_mean"] < 1.0


def test_embedding_bag_rejects_bad_arguments():
    with pytest.raises(ValueError) as err:
        EmbeddingBagEvaluator(num_bags=0, bag_size=-1, mode="median")
    msg = str(err.value)
    assert "num_bags=0" in msg and "bag_size=-1" in msg and "mode='median'" in msg


# ----------------------------------------------------------------------------- task


def _digits_accuracy(level: float, tmp_path: Path) -> dict[str, float]:
    from sparsify_exp.runner.examples.digits import DigitsMLP

    model = DigitsMLP()
    named = dict(model.named_parameters())
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
    ev = TaskEvaluator(fn="sparsify_exp.runner.examples.digits.accuracy")
    return run_hooks([ev], sp, named, tmp_path, model=model)


def test_task_digits_accuracy_falls_with_sparsity(tmp_path):
    low, high = _digits_accuracy(0.1, tmp_path), _digits_accuracy(0.99, tmp_path)
    assert low["task/accuracy/dense"] > 0.8  # chance is 0.1
    assert low["task/accuracy/dense"] == high["task/accuracy/dense"]  # same seeded model
    assert high["task/accuracy/sparse"] < low["task/accuracy/sparse"]
    assert high["task/accuracy/sparse"] < 0.5
    assert high["task/loss/sparse"] > low["task/loss/sparse"]
    assert low["task/accuracy/delta"] == pytest.approx(
        low["task/accuracy/sparse"] - low["task/accuracy/dense"]
    )


def test_digits_model_is_deterministic_and_cached(tmp_path):
    from sparsify_exp.runner.examples.digits import DigitsMLP, accuracy

    a = DigitsMLP(epochs=30, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("digits_mlp_*.pt"))) == 1
    b = DigitsMLP(epochs=30, cache_dir=str(tmp_path))  # loaded from the cache
    c = DigitsMLP(epochs=30, cache=False)  # trained again from the same seed
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    d = DigitsMLP(epochs=30, seed=1, cache=False)
    assert not torch.equal(a.net[0].weight, d.net[0].weight)
    assert accuracy(a)["accuracy"] > 0.5


def _sum_of_data(named_data, scale=1.0):
    return {"total": scale * float(sum(weight.sum() for weight in named_data.values()))}


def test_task_receives_data_mapping_and_kwargs(tmp_path):
    w = torch.ones(4, 4)
    ev = TaskEvaluator(fn=f"{__name__}._sum_of_data", kwargs={"scale": 2.0})
    m = run_hooks([ev], FirstRowSparsifier(), {"w": w}, tmp_path)
    assert m == {"task/total/dense": 32.0, "task/total/sparse": 24.0, "task/total/delta": -8.0}


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda d: 0.5, TypeError, "returned float, expected a dict"),
        (lambda d: {"acc": "high"}, TypeError, "acc='high', expected a number"),
    ],
)
def test_task_rejects_bad_results(tmp_path, fn, error, match):
    with pytest.raises(error, match=match):
        run_hooks([TaskEvaluator(fn=fn)], FirstRowSparsifier(), {"w": torch.ones(2, 2)}, tmp_path)


def test_task_resolves_dotted_paths():
    from sparsify_exp.runner.examples.digits import accuracy

    assert resolve_callable("sparsify_exp.runner.examples.digits.accuracy") is accuracy
    assert resolve_callable("torch.nn.functional.relu") is torch.nn.functional.relu
    with pytest.raises(ValueError, match="no importable module"):
        resolve_callable("no_such_pkg_xyz.f")
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_callable("sparsify_exp.runner.examples.digits.nope")
    with pytest.raises(ValueError, match="not a callable"):
        resolve_callable("sparsify_exp.runner.tracking.store.SPARSITY_KEY")
    with pytest.raises(ValueError, match="dotted path"):
        TaskEvaluator(fn="accuracy")
    with pytest.raises(ValueError, match="receives='weights'"):
        TaskEvaluator(fn=_sum_of_data, receives="weights")


def test_task_model_required_when_asked(tmp_path):
    ev = TaskEvaluator(fn=_sum_of_data, receives="model")
    with pytest.raises(ValueError, match="built no model"):
        run_hooks([ev], FirstRowSparsifier(), {"w": torch.ones(2, 2)}, tmp_path)
