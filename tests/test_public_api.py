"""The import surface: what `import sparsify_exp` gives, costs, and how it mirrors torch's API."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.ao.pruning._experimental.data_scheduler as torch_scheduler
import torch.ao.pruning._experimental.data_sparsifier as torch_sparsifier
from torch import nn

import sparsify_exp

PUBLIC = [
    "BaseDataSparsifier",
    "DataNormSparsifier",
    "FirstRowSparsifier",
    "BaseDataScheduler",
    "ConstantScheduler",
    "LinearScheduler",
    "StepScheduler",
    "CubicScheduler",
]


def test_top_level_imports():
    from sparsify_exp import (  # noqa: F401
        BaseDataScheduler,
        BaseDataSparsifier,
        ConstantScheduler,
        CubicScheduler,
        DataNormSparsifier,
        FirstRowSparsifier,
        LinearScheduler,
        StepScheduler,
    )

    for name in PUBLIC:
        assert name in sparsify_exp.__all__
        assert isinstance(getattr(sparsify_exp, name), type)
    for name in sparsify_exp.__all__:
        assert hasattr(sparsify_exp, name)


def test_class_hierarchy():
    from sparsify_exp import scheduler, sparsifier

    assert issubclass(sparsify_exp.DataNormSparsifier, sparsify_exp.BaseDataSparsifier)
    assert issubclass(sparsify_exp.FirstRowSparsifier, sparsify_exp.BaseDataSparsifier)
    for name in ("ConstantScheduler", "LinearScheduler", "StepScheduler", "CubicScheduler"):
        assert issubclass(getattr(sparsify_exp, name), sparsify_exp.BaseDataScheduler)
        assert getattr(scheduler, name) is getattr(sparsify_exp, name)
    assert sparsifier.DataNormSparsifier is sparsify_exp.DataNormSparsifier


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(
        f"""
        import sys
        {code}
        print("\\n".join(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import sparsify_exp",
        "from sparsify_exp import DataNormSparsifier, LinearScheduler, CubicScheduler",
        "import sparsify_exp.sparsifier, sparsify_exp.scheduler",
    ],
)
def test_import_does_not_load_runner_dependencies(code):
    loaded = _modules_after(code)
    assert "sparsify_exp" in loaded and "torch" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("hydra", "omegaconf", "mlflow")}
    assert not heavy, sorted(heavy)


def test_subprocess_check_can_fail():
    """The sys.modules probe does see a heavy import when one happens."""
    pytest.importorskip("omegaconf")
    assert "omegaconf" in _modules_after("import sparsify_exp, omegaconf")


def _params(func) -> list[str]:
    return [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


@pytest.mark.parametrize(
    "method",
    [
        "__init__",
        "add_data",
        "get_data",
        "get_mask",
        "step",
        "squash_mask",
        "state_dict",
        "load_state_dict",
        "update_mask",
    ],
)
def test_sparsifier_signatures_match_torch(method):
    ours = inspect.signature(getattr(sparsify_exp.BaseDataSparsifier, method))
    ref = inspect.signature(getattr(torch_sparsifier.BaseDataSparsifier, method))
    ours_params = ours.parameters
    ours_kinds = {p.kind for p in ours_params.values()}
    for name, param in ref.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            assert param.kind in ours_kinds, (method, name)  # *args / **kwargs, any name
            continue
        assert name in ours_params, (method, name)
        if param.default is not inspect.Parameter.empty:
            assert ours_params[name].default == param.default, (method, name)
    # anything torch takes positionally, we take at the same position
    assert _params(getattr(sparsify_exp.BaseDataSparsifier, method))[
        : len(_params(getattr(torch_sparsifier.BaseDataSparsifier, method)))
    ] == _params(getattr(torch_sparsifier.BaseDataSparsifier, method))


def test_data_norm_constructor_matches_torch():
    ours = inspect.signature(sparsify_exp.DataNormSparsifier.__init__).parameters
    ref = inspect.signature(torch_sparsifier.DataNormSparsifier.__init__).parameters
    assert list(ours)[: len(ref)] == list(ref)  # torch's arguments, at torch's positions
    for name, param in ref.items():
        assert ours[name].default == param.default, name
    # ours only adds arguments after them, each with a default (scope="local")
    assert list(ours)[len(ref) :] == ["scope"] and ours["scope"].default == "local"


def test_scheduler_constructor_matches_torch():
    ours = inspect.signature(sparsify_exp.BaseDataScheduler.__init__).parameters
    ref = inspect.signature(torch_scheduler.BaseDataScheduler.__init__).parameters
    assert list(ours) == list(ref)
    for name in ("state_dict", "load_state_dict", "step", "get_last_param"):
        assert hasattr(sparsify_exp.BaseDataScheduler, name)


def _user_script(ns: types.SimpleNamespace) -> dict[str, torch.Tensor]:
    """The same user code, run against either library: only the import differs."""
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(40, 12)
    weight = nn.Parameter(torch.randn(10, 16))
    sp = ns.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L2")
    sp.add_data("emb", emb)
    sp.add_data("weight", weight, sparsity_level=0.25, zeros_per_block=2)
    sp.step()
    masks = {n: (sp.get_mask(n) != 0).clone() for n in ("emb", "weight")}
    masked = sp.get_data("weight", return_original=False).detach().clone()
    sp.squash_mask()
    return {**masks, "masked": masked, "emb.weight": emb.weight.detach().clone()}


def test_switching_is_one_import():
    ours = _user_script(types.SimpleNamespace(DataNormSparsifier=sparsify_exp.DataNormSparsifier))
    ref = _user_script(
        types.SimpleNamespace(DataNormSparsifier=torch_sparsifier.DataNormSparsifier)
    )
    for key in ours:
        assert torch.equal(ours[key], ref[key]), key


def test_version():
    assert isinstance(sparsify_exp.__version__, str) and sparsify_exp.__version__


def test_a_state_dict_saved_by_torchs_reference_loads_and_keeps_stepping():
    from sparsify_exp import DataNormSparsifier

    torch.manual_seed(0)
    reference = torch_sparsifier.DataNormSparsifier(sparsity_level=0.5)
    reference.add_data("a", torch.randn(8, 8))
    reference.step()
    ours = DataNormSparsifier()
    ours.load_state_dict(reference.state_dict())  # sparse COO masks, reference's keys
    assert torch.equal(ours.get_mask("a"), reference.get_mask("a").bool())
    assert ours.data_groups["a"] == reference.data_groups["a"]
    ours.step()
    assert torch.equal(ours.get_mask("a"), reference.get_mask("a").bool())
