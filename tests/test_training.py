"""Training between sparsifier steps: masked forward, re-masking, the train group, eval.every."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sparsify_exp import DataNormSparsifier, load_masks
from sparsify_exp.runner import compose_config, run_overrides
from sparsify_exp.runner.train.loop import MaskedForward, remask
from sparsify_exp.runner.validate import validate


def _model_and_sparsifier(level: float = 0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 1))
    for name in ("0.weight", "2.weight"):
        sp.add_data(name, dict(model.named_parameters())[name])
    sp.step()
    return model, sp


def test_masked_forward_sees_masked_weights_and_gives_pruned_entries_no_gradient():
    model, sp = _model_and_sparsifier()
    x = torch.randn(5, 8)
    weight = model[0].weight
    masked = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)
    )  # the same weights, masked by hand
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("0.weight", "2.weight"):
            dict(masked.named_parameters())[name].mul_(sp.get_mask(name))
    with MaskedForward(model, sp):
        out = model(x)
        assert torch.allclose(out, masked(x))
        out.sum().backward()
        original = model[0].parametrizations.weight.original
        assert original is weight  # the sparsifier's tensor, by reference
        assert (original.grad[~sp.get_mask("0.weight")] == 0).all()
    assert model[0].weight is weight  # the plain parameter is back, unmasked
    assert not torch.nn.utils.parametrize.is_parametrized(model[0])
    assert (model[0].weight != 0).all()


def test_remask_zeroes_what_the_optimizer_moved_in_place():
    model, sp = _model_and_sparsifier()
    weight = model[0].weight
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer that moved pruned entries
    remask(sp)
    assert model[0].weight is weight
    assert torch.equal(weight == 0, ~sp.get_mask("0.weight"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.every=0"], "eval.every=0: must be an integer >= 1"),
        (["train=digits", "train.steps_per_step=-1"], "train.steps_per_step=-1: must be >= 0"),
        (["train=digits", "train.fn._target_=nowhere.fn"], "train.fn._target_=nowhere.fn: cannot"),
        (["train=digits", "+train.fn.speed=2"], "train.fn.speed=2: not an argument of finetune"),
    ],
)
def test_train_and_eval_every_mistakes_are_one_line(overrides, expected):
    (problem,) = validate(compose_config(["data=digits_mlp", *overrides]))
    assert problem.startswith(expected)


def test_eval_every_is_accepted_without_plus_and_evaluators_stay_listed_alone():
    cfg = compose_config(["eval=[fidelity,embedding_bag]", "data=embeddings"])
    assert list(cfg.eval) == ["fidelity", "embedding_bag"]
    cfg = compose_config(["eval.every=3"])
    assert cfg.eval.every == 3 and validate(cfg) == []


def test_gradual_pruning_with_training_logs_per_step_quality_and_squashes_exact_zeros(
    store, tmp_path
):
    run_id = run_overrides(
        [
            "data=digits_mlp",
            "train=digits",
            "train.steps_per_step=5",
            "schedule=cubic",
            "schedule.steps=4",
            "sparsifier.sparsity_level=0.8",
            "eval=[fidelity,digits_accuracy]",
            "eval.every=1",
            "mlflow.mask_images=0",
        ],
        output_dir=tmp_path / "job",
    )
    client = store.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "task/accuracy/sparse", "sparsity/overall"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [0, 1, 2, 3], key
    assert run.data.metrics["sparsity/overall"] == pytest.approx(0.8, abs=0.01)
    # against the dense weights before training: the pruned 80% are far from them
    assert 0.3 < run.data.metrics["fidelity/rel_error"] < 1.5
    masks = load_masks(tmp_path / "job" / "artifacts" / "masks" / "final.safetensors")
    data = load_file(str(tmp_path / "job" / "artifacts" / "data" / "sparsified.safetensors"))
    for name, mask in masks.items():
        assert torch.equal(data[name] == 0, ~mask), name  # exactly the mask's zeros


def train_then_crash(ctx, lr: float = 0.0) -> dict[str, float]:
    if ctx.step == 1:
        raise ValueError("loss diverged")
    return {"loss": 0.5}


def test_a_training_callable_that_raises_fails_the_run_and_keeps_its_metrics(store, tmp_path):
    with pytest.raises(RuntimeError, match=r"train\.fn failed at step 1: ValueError"):
        run_overrides(
            [
                "train=digits",
                f"train.fn._target_={__name__}.train_then_crash",
                "schedule=linear",
                "schedule.steps=3",
                "eval=[]",
            ],
            output_dir=tmp_path / "job",
        )
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert "loss diverged" in run.data.tags["sparsify.failure"]
    assert run.data.metrics["train/loss"] == 0.5  # step 0's metrics stay
    assert [m.step for m in store.client.get_metric_history(run.info.run_id, "train/loss")] == [0]
