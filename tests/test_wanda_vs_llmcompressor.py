"""Our Wanda masks equal llmcompressor's (``WandaPruningModifier``'s own row statistics and
``sparsify_weight``) on the same statistics, for a small model built from a config.

llmcompressor pins its own torch and transformers, so it usually lives in its own
virtualenv: the test uses it in-process when importable, else the virtualenv that
``python scripts/bench_vs_llmcompressor.py --setup-peer`` makes, else it is skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsify_exp import WandaSparsifier, collect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PEER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import (
        accumulate_row_scalars, make_empty_row_scalars, sparsify_weight,
    )

    case = torch.load(sys.argv[1])
    out = {}
    for name, (weight, inputs) in case["layers"].items():
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        module.weight.data.copy_(weight)
        scalars, samples = make_empty_row_scalars(module), 0
        for x in inputs:
            scalars, samples = accumulate_row_scalars(x, module, scalars, samples)
        for key, (sparsity, n, m) in case["structures"].items():
            pruned = sparsify_weight(module, {module: scalars.clone()}, sparsity, n, m)
            out[f"{name}/{key}"] = pruned != 0
        out[f"{name}/scalars"] = scalars
    torch.save(out, sys.argv[2])
    """
)


def peer_command() -> list[str] | None:
    if importlib.util.find_spec("llmcompressor") is not None:
        return [sys.executable]
    from bench_vs_llmcompressor import peer_python

    python = peer_python()
    return [str(python)] if python.exists() else None


class Tower(nn.Module):
    """Two Linear layers of a config's sizes; inputs of very different feature scales."""

    def __init__(self, sizes: tuple[int, ...] = (64, 48, 32)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_masks_equal_llmcompressors_on_the_same_statistics(tmp_path):
    command = peer_command()
    if command is None:
        pytest.skip(
            "llmcompressor is not installed here: run `python "
            "scripts/bench_vs_llmcompressor.py --setup-peer` (its own virtualenv) to run this"
        )
    torch.manual_seed(0)
    model = Tower()
    gen = torch.Generator().manual_seed(1)
    scale = torch.logspace(-1, 1, 64)
    batches = [torch.randn(4, 16, 64, generator=gen) * scale for _ in range(5)]
    # the inputs each Linear saw, as the peer's hooks would see them
    seen: dict[str, list[torch.Tensor]] = {"fc1": [], "fc2": []}
    hooks = [
        getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0]))
        for n in seen
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    structures = {"u50": (0.5, 0, 0), "u70": (0.7, 0, 0), "nm24": (0.5, 2, 4)}
    case = {
        "layers": {n: (getattr(model, n).weight.detach(), seen[n]) for n in seen},
        "structures": structures,
    }
    torch.save(case, tmp_path / "case.pt")
    subprocess.run(
        [*command, "-c", PEER_SCRIPT, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
        check=True,
        capture_output=True,
    )
    theirs = torch.load(tmp_path / "out.pt")
    ours_stats = collect(model, batches, needs=("input_norms",)).input_norms()
    for name in seen:
        weight = getattr(model, name).weight
        for key, (sparsity, n, m) in structures.items():
            kwargs = {"n": m - n, "m": m} if m else {"sparsity_level": sparsity}
            expected = theirs[f"{name}/{key}"]
            # the same statistics: their row scalars, as their score takes them (sqrt in fp32)
            sp = WandaSparsifier(**kwargs)
            sp.add_data(name, weight, input_norms=theirs[f"{name}/scalars"].sqrt())
            sp.step()
            assert torch.equal(sp.get_mask(name), expected), (name, key)
            # and our own collector's statistics (another scale, float64) rank the same
            sp = WandaSparsifier(**kwargs)
            sp.add_data(name, weight, input_norms=ours_stats[f"{name}.weight"])
            sp.step()
            assert torch.equal(sp.get_mask(name), expected), (name, key, "own statistics")
