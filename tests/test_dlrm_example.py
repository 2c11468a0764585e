"""The DLRM example: a click model that learns, a run that logs dense and sparse AUC."""

from __future__ import annotations

import torch

from sparsify_exp.runner import compose_config, run_overrides
from sparsify_exp.runner.examples.dlrm import DLRM, auc, load_data, roc_auc
from sparsify_exp.runner.validate import validate

# At 0.9 the kept 10% of each table still holds the frequent ids that carry the signal (AUC
# stays at the dense value, or just above: the tail's noise goes too); 0.99 cuts into them.
OVERRIDES = ["data=dlrm", "eval=[dlrm_auc]", "sparsifier.sparsity_level=0.99"]


def test_roc_auc_ranks_and_ties():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert roc_auc(torch.zeros(4), y) == 0.5  # all tied: chance
    # one positive above both negatives, one tied with a negative: (2 + 1.5) / 4
    assert roc_auc(torch.tensor([0.1, 0.5, 0.5, 0.9]), y) == 0.875


def test_model_beats_chance_deterministically(tmp_path):
    (_, ids, y), _ = load_data()
    assert 0.3 < float(y.mean()) < 0.7
    counts = torch.bincount(ids[0].flatten())
    assert counts[:10].sum() > counts[-500:].sum()  # Zipf: a few ids carry the traffic
    scores = auc(DLRM())  # the cached model (trained once per machine, ~6 s)
    assert scores["auc"] > 0.7, scores
    assert scores["logloss"] < 0.65, scores
    # training is deterministic: two uncached runs (1 epoch, to keep it quick) agree exactly
    one, two = (DLRM(epochs=1, cache_dir=str(tmp_path / d)) for d in ("a", "b"))
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "a").is_dir() and list((tmp_path / "a").glob("dlrm_*.pt"))
    assert torch.equal(
        DLRM(epochs=1, cache_dir=str(tmp_path / "a")).top[0].weight, one.top[0].weight
    )


def test_config_validates():
    assert validate(compose_config([*OVERRIDES, "mlflow.mask_images=0"])) == []
    cfg = compose_config(["data=dlrm", "eval=[fidelity,dlrm_auc,embedding_bag]"])
    assert validate(cfg) == []


def test_run_logs_dense_and_sparse_auc(store, tmp_path):
    run_id = run_overrides([*OVERRIDES, "mlflow.mask_images=0"], output_dir=tmp_path / "job")
    metrics = store.client.get_run(run_id).data.metrics
    dense, sparse = metrics["task/auc/dense"], metrics["task/auc/sparse"]
    assert dense > 0.7
    assert sparse < dense - 0.02
    assert metrics["sparsity/overall"] > 0.98
    assert "task/logloss/sparse" in metrics
