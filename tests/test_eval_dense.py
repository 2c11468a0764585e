"""Evaluators that compare with the dense reference, and where their text comes from."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.evaluation import EvalContext, Evaluator, TaskEvaluator
from sparsify_exp.runner.evaluation.text import load_texts, stdlib_texts

CALLS: list[str] = []


def drift(model, dense) -> dict[str, float]:
    """A task callable that compares the sparsified model with the dense one itself."""
    CALLS.append("drift")
    x = torch.randn(64, 784, generator=torch.Generator().manual_seed(0))
    a, b = model(x), dense(x)
    assert model is not dense
    return {"cosine": torch.nn.functional.cosine_similarity(a, b).mean()}


class WeightDrift(Evaluator):
    """The class route: every hook sees ctx.dense."""

    name = "weight_drift"
    wants_dense = True

    def on_start(self, ctx: EvalContext) -> dict[str, float]:
        assert ctx.dense is not None and ctx.dense.model is not ctx.model
        return {}

    def on_end(self, ctx: EvalContext) -> dict[str, float]:
        dense = ctx.dense.model.state_dict()
        sparse = ctx.model.state_dict()
        changed = sum(int((dense[n] != sparse[n]).sum()) for n in ctx.named_data)
        return {"weight_drift/changed": float(changed)}


def test_task_callable_and_evaluator_class_get_the_dense_model(store, tmp_path):
    CALLS.clear()
    rid = run_overrides(
        [
            "mlflow.mask_images=0",
            "data=model",
            "sparsifier=magnitude",
            "eval=[task]",
            f"eval.task.fn={__name__}.drift",
            f"+eval.weight_drift._target_={__name__}.WeightDrift",
        ],
        output_dir=tmp_path / "job",
    )
    m = store.client.get_run(rid).data.metrics
    assert CALLS == ["drift"]  # once, after the squash: no dense-against-dense forward pass
    assert 0.0 < m["task/cosine/sparse"] < 1.0
    assert "task/cosine/dense" not in m and "task/cosine/delta" not in m
    # magnitude 0.5 on the MLP's weights (784x256 + 256x128 + 128x10) and biases: each halved
    entries = 784 * 256 + 256 * 128 + 128 * 10 + 256 + 128 + 10
    assert m["weight_drift/changed"] == pytest.approx(entries / 2, abs=5)


def test_task_callable_without_dense_is_unchanged():
    ev = TaskEvaluator(fn=f"{__name__}.load_texts")
    assert not ev.wants_dense
    assert TaskEvaluator(fn=f"{__name__}.drift").wants_dense


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# title\n\nbody text")
    (tmp_path / "skip.py").write_text("not text")
    assert load_texts(str(tmp_path / "a.txt"), 10) == ["first paragraph still first", "second one"]
    assert load_texts(str(tmp_path), 10) == [
        "first paragraph still first",
        "second one",
        "# title",
        "body text",
    ]
    assert load_texts(str(tmp_path), 3)[-1] == "# title"
    assert load_texts(["a  b", " ", "c"], 5) == ["a b", "c"]
    with pytest.raises(ValueError, match="text=nowhere: no such file or folder"):
        load_texts("nowhere", 5)
    with pytest.raises(ValueError, match="no non-empty text"):
        load_texts([" "], 5)


def test_stdlib_splits_are_disjoint_english_prose():
    held, calib = stdlib_texts("heldout"), stdlib_texts("calibration")
    assert len(held) > 200 and len(calib) > 200
    assert not set(held) & set(calib)
    assert all(len(p.split()) >= 8 and ">>>" not in p for p in held)
    assert load_texts("stdlib:heldout", 7) == held[:7]
    with pytest.raises(ValueError, match="stdlib:train: must be one of heldout, calibration"):
        load_texts("stdlib:train", 5)


def test_missing_transformers_is_one_line_naming_the_extra(monkeypatch, store, tmp_path):
    from sparsify_exp.runner.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real(name, *a),
    )
    with pytest.raises(ConfigError) as e:
        run_overrides(["data=hf", f"data.path={tmp_path}"], output_dir=tmp_path / "job")
    assert f"data.path={tmp_path}: needs transformers: pip install 'sparsify-exp[hf]'" in str(
        e.value
    )
