"""Lightning pieces for tests/test_lightning.py: a tiny classifier, a recording callback and a
CPU trainer. Kept apart so that only the xdist worker that runs the Lightning tests pays for
importing Lightning (about 5 CPU-s), not every worker that collects them."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from sparsify_exp.lightning import (
    PostTrainingDataSparsity,
    TrainingAwareDataSparsity,
    sparsifiable_parameters,
)

__all__ = [
    "WEIGHTS",
    "Classifier",
    "L",
    "Net",
    "PostTrainingDataSparsity",
    "Recorder",
    "TrainingAwareDataSparsity",
    "fit",
    "sparsifiable_parameters",
]

# the selected weights of Net, by dotted name, and their (1, 4) block counts
WEIGHTS = {"emb.weight": 200, "head.0.weight": 128, "head.2.0.weight": 32}


class Net(nn.Module):
    """An embedding bag and a nested Sequential: names like ``head.2.0.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 16, mode="mean")
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 50, (32, 5), generator=g)
        return DataLoader(TensorDataset(x, x[:, 0] % 4), batch_size=16)


class Recorder(L.Callback):
    """Placed after the callback under test: what it left after each epoch and at the end."""

    def __init__(self, callback) -> None:
        self.callback = callback
        self.zeros: list[dict[str, float]] = []  # per epoch: fraction of zeros in .sparsified
        self.logged: list[float] = []  # per epoch: sparsity/overall as the trainer has it
        self.trained: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if not isinstance(self.callback, TrainingAwareDataSparsity):
            return
        params = dict(self.callback.sparsified.named_parameters())
        self.zeros.append({n: (params[n] == 0).float().mean().item() for n in WEIGHTS})
        self.logged.append(float(trainer.callback_metrics["sparsity/overall"]))

    def on_train_end(self, trainer, pl_module):  # before on_fit_end
        self.trained = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def fit(tmp_path, module, callbacks, max_epochs: int = 3, logger=False, **fit_kwargs):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        log_every_n_steps=1,
    )
    trainer.fit(module, **fit_kwargs)
    return trainer
