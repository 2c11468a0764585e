"""The Lightning callbacks, driven by a real ``lightning.Trainer`` on CPU with tiny data."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.ao.pruning._experimental.data_sparsifier as torch_sparsifier
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from sparsify_exp import (
    BaseDataSparsifier,
    ConfigValueError,
    ConstantScheduler,
    CubicScheduler,
    DataNormSparsifier,
    FirstRowSparsifier,
    LinearScheduler,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.*LeafSpec.*is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def pl():
    """tests/lightning_parts.py, imported on first use (skipped without Lightning)."""
    pytest.importorskip("lightning")
    import lightning_parts

    return lightning_parts


def cubic_levels(epochs: int, initial: float = 0.25, target: float = 0.75, steps: int = 2):
    return [target + (initial - target) * (1 - min(e / steps, 1.0)) ** 3 for e in range(epochs)]


def block_sparsity(level: float, blocks: int) -> float:
    """What DataNormSparsifier with (1, 4) blocks removes: round(level * blocks) blocks."""
    return round(level * blocks) / blocks


def test_import_sparsify_exp_does_not_load_lightning():
    code = "import sys, sparsify_exp; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("sparsifier", ["data_norm", "first_row"])
def test_post_training_sparsifies_a_copy_and_leaves_the_module(tmp_path, sparsifier, pl):
    if sparsifier == "data_norm":
        cls, args = DataNormSparsifier, {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}
    else:
        cls, args = FirstRowSparsifier, {}
    callback = pl.PostTrainingDataSparsity(cls, args)
    recorder = pl.Recorder(callback)
    module = pl.Classifier()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    pl.fit(tmp_path, module, [recorder, callback], max_epochs=2)

    trained = module.model.state_dict()
    assert not torch.equal(trained["head.0.weight"], initial["head.0.weight"])  # it trained
    for key, value in trained.items():  # ... and the callback did not touch it
        assert torch.equal(value, recorder.trained[key]), key
    sparse = callback.sparsified.state_dict()
    assert set(sparse) == set(trained)
    assert not callback.sparsified.training
    for name, blocks in pl.WEIGHTS.items():
        expected = (
            block_sparsity(0.5, blocks) if cls is DataNormSparsifier else 1 / len(sparse[name])
        )
        zeros = (sparse[name] == 0).float().mean().item()
        assert zeros == pytest.approx(expected), name
        assert callback.sparsity[f"sparsity/{name}"] == pytest.approx(expected), name
        mask = callback.data_sparsifier.get_mask(name)
        assert torch.equal(sparse[name], trained[name] * mask), name
    for name in ("head.0.bias", "head.2.0.bias"):  # not a weight: left dense
        assert torch.equal(sparse[name], trained[name])
    assert set(callback.data_sparsifier.data_groups) == set(pl.WEIGHTS)
    numel = {n: trained[n].numel() for n in pl.WEIGHTS}
    overall = sum(callback.sparsity[f"sparsity/{n}"] * numel[n] for n in pl.WEIGHTS)
    assert callback.sparsity["sparsity/overall"] == pytest.approx(overall / sum(numel.values()))


def test_training_aware_follows_the_scheduler(tmp_path, pl):
    """DataNormSparsifier + CubicScheduler: each epoch's copy has that epoch's level."""
    callback = pl.TrainingAwareDataSparsity(
        DataNormSparsifier,
        {"sparsity_level": 0.75, "sparse_block_shape": (1, 4)},
        CubicScheduler,
        {"initial_value": 0.25, "total_steps": 2},
    )
    recorder = pl.Recorder(callback)
    module = pl.Classifier()
    pl.fit(tmp_path, module, [callback, recorder], max_epochs=3)

    levels = cubic_levels(3)  # 0.25, 0.6875, 0.75
    assert len(recorder.zeros) == 3
    for epoch, level in enumerate(levels):
        for name, blocks in pl.WEIGHTS.items():
            assert recorder.zeros[epoch][name] == pytest.approx(block_sparsity(level, blocks)), (
                epoch,
                name,
            )
    assert recorder.logged == sorted(recorder.logged) and recorder.logged[0] < recorder.logged[-1]
    assert recorder.logged[-1] == pytest.approx(callback.sparsity["sparsity/overall"])
    # the scheduler has moved on to the level of the epoch after the last
    assert callback.data_sparsifier.data_groups["head.0.weight"]["sparsity_level"] == 0.75
    # the trained module itself is dense: only the copies are sparsified
    for name in pl.WEIGHTS:
        assert (module.model.get_parameter(name) == 0).sum() == 0, name


class GrowingRows(BaseDataSparsifier):
    """Zeroes one more row than the mask already lacks: masks reused across steps grow."""

    def update_mask(self, name, data, **config):
        mask = self.get_mask(name)
        kept = mask.all(dim=1).nonzero()
        if len(kept):
            mask[kept[0, 0]] = False


def test_training_aware_reuses_the_previous_masks(tmp_path, pl):
    callback = pl.TrainingAwareDataSparsity(GrowingRows, {}, ConstantScheduler, {"target": 0.0})
    recorder = pl.Recorder(callback)
    pl.fit(tmp_path, pl.Classifier(), [callback, recorder], max_epochs=3)
    for epoch in range(3):
        weight = "head.0.weight"  # 32 rows
        assert recorder.zeros[epoch][weight] == pytest.approx((epoch + 1) / 32), epoch


def test_module_without_model_and_every_parameter(tmp_path, pl):
    """No ``.model``: the LightningModule itself is copied; ``module_types=None``: biases too."""

    class Bare(pl.L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 2)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.layers(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 2)), batch_size=4)

    callback = pl.PostTrainingDataSparsity(FirstRowSparsifier, {}, module_types=None)
    module = Bare()
    pl.fit(tmp_path, module, [callback], max_epochs=2)
    names = [n for n, _ in module.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.0.weight", "layers.1.0.bias"]
    assert list(callback.data_sparsifier.data_groups) == names
    assert isinstance(callback.sparsified, Bare) and callback.sparsified is not module
    for name in names:
        assert (callback.sparsified.get_parameter(name)[0] == 0).all(), name
        assert (module.get_parameter(name)[0] != 0).all(), name


def test_sparsifiable_parameters_tied_parametrized_and_dotted(pl):
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))])
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight
            self.scaled = nn.Linear(4, 4)
            parametrize.register_parametrization(self.scaled, "weight", Scale())

    model = Tied()
    assert list(pl.sparsifiable_parameters(model)) == ["emb.weight", "blocks.0.0.weight"]
    assert pl.sparsifiable_parameters(model)["emb.weight"] is model.emb.weight
    everything = pl.sparsifiable_parameters(model, module_types=None)
    assert "blocks.0.1.weight" in everything and "blocks.0.0.bias" in everything
    assert "out.weight" not in everything  # the tied weight, once
    assert "scaled.parametrizations.weight.original" in everything
    assert list(pl.sparsifiable_parameters(model, (nn.LayerNorm,))) == ["blocks.0.1.weight"]


def test_mlflow_logger_gets_the_sparsity(tmp_path, store, pl):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=store.uri)
    aware = pl.TrainingAwareDataSparsity(
        DataNormSparsifier,
        {"sparse_block_shape": (1, 4)},
        LinearScheduler,
        {"initial_value": 0.0, "target": 0.5, "total_steps": 2},
    )
    post = pl.PostTrainingDataSparsity(
        DataNormSparsifier, {"sparsity_level": 0.5}, log_prefix="post_training"
    )
    pl.fit(tmp_path, pl.Classifier(), [aware, post], max_epochs=3, logger=logger)

    client = store.client
    (run,) = client.search_runs([client.get_experiment_by_name("lightning").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "sparsity/head.0.weight")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [0.0, 0.25, 0.5]
    )
    assert len({m.step for m in history}) == 3  # one per epoch
    overall = client.get_metric_history(run.info.run_id, "sparsity/overall")
    assert len(overall) == 3 and overall[-1].value > 0
    metrics = run.data.metrics
    assert metrics["post_training/head.2.0.weight"] == pytest.approx(0.5)
    assert metrics["post_training/overall"] == pytest.approx(post.sparsity["post_training/overall"])
    assert {k for k in metrics if k.startswith("post_training/")} == {
        "post_training/overall",
        *(f"post_training/{n}" for n in pl.WEIGHTS),
    }


def test_resumed_training_continues_the_schedule(tmp_path, pl):
    def callback():
        return pl.TrainingAwareDataSparsity(
            DataNormSparsifier,
            {"sparsity_level": 0.75},
            CubicScheduler,
            {"initial_value": 0.25, "total_steps": 2},
        )

    module = pl.Classifier()
    trainer = pl.fit(tmp_path, module, [callback()], max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = callback()
    recorder = pl.Recorder(resumed)
    pl.fit(tmp_path, pl.Classifier(), [resumed, recorder], max_epochs=3, ckpt_path=str(ckpt))
    assert len(recorder.zeros) == 1  # only epoch 2 ran, at epoch 2's level, not epoch 0's
    expected = block_sparsity(cubic_levels(3)[2], pl.WEIGHTS["head.0.weight"])
    assert recorder.zeros[0]["head.0.weight"] == pytest.approx(expected)


def test_bad_arguments_fail_at_once(pl):
    with pytest.raises(TypeError, match="must be a class"):
        pl.PostTrainingDataSparsity(DataNormSparsifier(), {})
    with pytest.raises(TypeError, match="import them from sparsify_exp"):
        pl.PostTrainingDataSparsity(torch_sparsifier.DataNormSparsifier, {})
    with pytest.raises(TypeError, match="data_scheduler_class"):
        pl.TrainingAwareDataSparsity(DataNormSparsifier, {}, DataNormSparsifier, {})
    with pytest.raises(ValueError, match="data_sparsifier"):
        pl.TrainingAwareDataSparsity(
            DataNormSparsifier, {}, CubicScheduler, {"data_sparsifier": None}
        )


@pytest.mark.parametrize(
    ("callback", "error"),
    [
        (
            lambda pl: pl.PostTrainingDataSparsity(DataNormSparsifier, {"sparsity_level": 2}),
            ConfigValueError,
        ),
        (
            lambda pl: pl.PostTrainingDataSparsity(
                FirstRowSparsifier, {}, module_types=(nn.Conv2d,)
            ),
            ValueError,
        ),
    ],
    ids=["bad_level", "nothing_to_sparsify"],
)
def test_post_training_problems_fail_before_training(tmp_path, callback, error, pl):
    module = pl.Classifier()
    initial = module.model.head[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            pl.fit(tmp_path, module, [callback(pl)], max_epochs=2)
    assert torch.equal(module.model.head[0].weight, initial)  # no step was taken


def test_constructors_take_torchs_arguments_in_torchs_order(pl):
    pytest.importorskip("pytorch_lightning")  # torch's callbacks import it
    import inspect

    from torch.ao.pruning._experimental.data_sparsifier.lightning.callbacks import (
        data_sparsity as reference,
    )

    for name in ("PostTrainingDataSparsity", "TrainingAwareDataSparsity"):
        ref = list(inspect.signature(getattr(reference, name).__init__).parameters)
        ours = inspect.signature(getattr(pl, name).__init__).parameters
        assert list(ours)[: len(ref)] == ref, name
        extra = [p for n, p in ours.items() if n not in ref]
        assert extra and all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra)
