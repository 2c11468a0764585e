"""Schedulers: the reference's API and warnings, each schedule's values, per-name targets."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch.ao.pruning._experimental.data_scheduler import (
    BaseDataScheduler as RefBaseScheduler,
)
from torch.ao.pruning._experimental.data_sparsifier import (
    DataNormSparsifier as RefDataNorm,
)

from sparsify_exp import (
    BaseDataScheduler,
    ConstantScheduler,
    CubicScheduler,
    DataNormSparsifier,
    FirstRowSparsifier,
    LinearScheduler,
    StepScheduler,
)


def make_sparsifier(level=0.5, names=("a", "b"), **per_name):
    torch.manual_seed(0)
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
    for name in names:
        sp.add_data(name, torch.randn(10, 8), **per_name.get(name, {}))
    return sp


def levels(sp, name="a"):
    return sp.data_groups[name]["sparsity_level"]


def run(sched, sp, epochs):
    """Values of ``a`` at epochs 0..epochs (epoch 0 set by the constructor)."""
    out = [levels(sp)]
    for _ in range(epochs):
        sp.step()
        sched.step()
        out.append(levels(sp))
    return out


# ---------------------------------------------------------------------- the base API


class Halving(BaseDataScheduler):
    """torch's documented example: halve the value every step."""

    def get_schedule_param(self):
        return {
            name: config[self.schedule_param] * 0.5
            for name, config in self.data_sparsifier.data_groups.items()
        }


class RefHalving(RefBaseScheduler):
    def get_schedule_param(self):
        return {
            name: config[self.schedule_param] * 0.5
            for name, config in self.data_sparsifier.data_groups.items()
        }


def test_base_scheduler_behaves_like_the_reference():
    torch.manual_seed(1)
    data = {"a": torch.randn(6, 8), "b_c": torch.randn(9)}  # the reference cannot take dots
    ours = DataNormSparsifier(sparsity_level=0.8)
    ref = RefDataNorm(sparsity_level=0.8)
    for name, t in data.items():
        ours.add_data(name, t.clone(), sparsity_level=0.8 if name == "a" else 0.4)
        ref.add_data(name, t.clone(), sparsity_level=0.8 if name == "a" else 0.4)
    ours_sched = Halving(ours, "sparsity_level")
    ref_sched = RefHalving(ref, "sparsity_level")
    assert ours_sched.base_param == ref_sched.base_param == {"a": 0.8, "b_c": 0.4}
    assert ours_sched.last_epoch == ref_sched.last_epoch == 0
    assert ours_sched.get_last_param() == ref_sched.get_last_param() == {"a": 0.4, "b_c": 0.2}
    for _ in range(4):
        ours.step()
        ref.step()
        ours_sched.step()
        ref_sched.step()
        assert ours_sched.get_last_param() == ref_sched.get_last_param()
        assert ours_sched.last_epoch == ref_sched.last_epoch
        for name in data:
            assert torch.equal(
                ours.get_mask(name), (ref.get_mask(name) != 0).view(-1).view_as(ours.get_mask(name))
            )
    assert ours._step_count == ref._step_count == 4


def test_constructor_takes_step_zero():
    sp = make_sparsifier(level=0.6)
    sched = LinearScheduler(sp, total_steps=4, initial_value=0.1, target=0.5)
    assert sched.last_epoch == 0
    assert sched._step_count == 1
    assert levels(sp) == pytest.approx(0.1)
    assert sched.get_last_param() == {"a": pytest.approx(0.1), "b": pytest.approx(0.1)}
    assert sched.base_param == {"a": 0.6, "b": 0.6}


def test_scheduler_steps_enable_mask_update_and_drive_masks():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=4, initial_value=0.0, target=1.0)
    sp.step()
    for epoch in range(6):
        sp.enable_mask_update = False
        sched.step()
        assert sp.enable_mask_update is True
        sp.step()
        level = min((epoch + 1) / 4, 1.0)
        assert int((~sp.get_mask("a")).sum()) == round(level * 20) * 4


def test_warning_when_scheduler_steps_before_sparsifier():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=4, target=0.5)
    with pytest.warns(UserWarning, match=r"before `data_sparsifier.step\(\)`"):
        sched.step()


def test_warning_when_sparsifier_step_is_overridden():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=4, target=0.5)
    sp.step = lambda: None
    with pytest.warns(UserWarning, match="overridden"):
        sched.step()


def test_no_warning_in_the_right_order():
    sp = make_sparsifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = CubicScheduler(sp, total_steps=3, target=0.5)
        for _ in range(5):
            sp.step()
            sched.step()
    assert sp._step_count == 5


def test_sparsifier_step_counter_counts_and_still_steps():
    sp = make_sparsifier()
    sched = ConstantScheduler(sp, target=0.5)
    assert getattr(sp.step, "_with_counter", False)
    sp.step()
    sp.step()
    assert sp._step_count == 2
    assert int((~sp.get_mask("a")).sum()) == 40
    # a second scheduler does not wrap twice
    ConstantScheduler(sp, target=0.5)
    sp.step()
    assert sp._step_count == 1
    del sched


def test_state_dict_round_trip(tmp_path):
    sp = make_sparsifier()
    sched = CubicScheduler(sp, total_steps=6, target=0.9, start_step=1, step_interval=1)
    run(sched, sp, 3)
    path = tmp_path / "sched.pt"
    torch.save({"sp": sp.state_dict(), "sched": sched.state_dict()}, path)
    saved = torch.load(path)
    assert "data_sparsifier" not in saved["sched"]

    sp2 = DataNormSparsifier()
    sp2.load_state_dict(saved["sp"])
    sched2 = CubicScheduler(sp2, total_steps=6, target=0.9, start_step=1, step_interval=1)
    assert sched2.last_epoch == 0
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == sched.last_epoch == 3
    assert sched2.get_last_param() == sched.get_last_param()
    for _ in range(4):
        sp.step()
        sp2.step()
        sched.step()
        sched2.step()
        assert sched2.get_last_param() == sched.get_last_param()
        assert sp2.data_groups == sp.data_groups
    sp.step()
    sp2.step()
    assert torch.equal(sp2.get_mask("a").bool(), sp.get_mask("a"))


def test_state_dict_excludes_sparsifier_and_is_a_copy_source():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=3, target=0.5)
    sd = sched.state_dict()
    assert "data_sparsifier" not in sd
    assert sd["last_epoch"] == 0
    clone = copy.deepcopy(sd)
    sp.step()
    sched.step()
    assert clone["last_epoch"] == 0


def test_scheduler_accepts_torch_reference_sparsifier():
    torch.manual_seed(2)
    ref = RefDataNorm(sparsity_level=0.5)
    ref.add_data("w", torch.randn(10, 8))
    ref.add_data("v", torch.randn(10, 8), sparsity_level=0.25)
    sched = LinearScheduler(ref, total_steps=4, initial_value=0.0)  # targets: configured
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(1, 6):
            ref.step()
            sched.step()
            progress = min(epoch / 4, 1.0)
            assert ref.data_groups["w"]["sparsity_level"] == pytest.approx(0.5 * progress)
            assert ref.data_groups["v"]["sparsity_level"] == pytest.approx(0.25 * progress)
    ref.step()
    assert int((ref.get_mask("w") == 0).sum()) == 10 * 4
    assert int((ref.get_mask("v") == 0).sum()) == 5 * 4


def test_rejects_non_sparsifiers():
    with pytest.raises(TypeError):
        LinearScheduler(object(), total_steps=2, target=0.5)
    with pytest.raises(TypeError):
        Halving(torch.nn.Linear(2, 2), "sparsity_level")


def test_get_schedule_param_is_abstract():
    with pytest.raises(TypeError):
        BaseDataScheduler(make_sparsifier(), "sparsity_level")  # type: ignore[abstract]


def test_scheduling_another_config_key():
    sp = FirstRowSparsifier(threshold=2.0)
    sp.add_data("a", torch.randn(3, 3))
    sched = StepScheduler(sp, "threshold", step_size=1, gamma=3.0)
    assert sp.data_groups["a"]["threshold"] == 2.0
    sp.step()
    sched.step()
    assert sp.data_groups["a"]["threshold"] == pytest.approx(6.0)  # not clamped to [0, 1]


def test_verbose_prints(capsys):
    sp = make_sparsifier(names=("only",))
    ConstantScheduler(sp, target=0.3, verbose=True)
    assert "only" in capsys.readouterr().out


# ---------------------------------------------------------------- concrete schedules


def test_constant():
    sp = make_sparsifier(level=0.9)
    sched = ConstantScheduler(sp, target=0.4)
    assert run(sched, sp, 5) == [0.4] * 6
    sp2 = make_sparsifier(level=0.9)
    sched2 = ConstantScheduler(sp2)  # target None: the configured value
    assert run(sched2, sp2, 2) == [0.9] * 3


def test_linear_endpoints_and_midpoint():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=10, initial_value=0.1, target=0.9)
    values = run(sched, sp, 14)
    assert values[0] == pytest.approx(0.1)
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(0.9)
    assert values[14] == pytest.approx(0.9)
    expected = [0.1 + 0.8 * min(t / 10, 1) for t in range(15)]
    assert values == pytest.approx(expected)
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_linear_with_start_step_and_decreasing():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=4, initial_value=0.8, target=0.0, start_step=3)
    values = run(sched, sp, 9)
    assert values == pytest.approx([0.8, 0.8, 0.8, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0])


def test_linear_zero_steps_jumps_at_start():
    sp = make_sparsifier()
    sched = LinearScheduler(sp, total_steps=0, initial_value=0.0, target=0.7, start_step=2)
    assert run(sched, sp, 3) == pytest.approx([0.0, 0.0, 0.7, 0.7])


def test_step_multiplies_and_caps_at_target():
    sp = make_sparsifier()
    sched = StepScheduler(sp, step_size=2, gamma=2.0, initial_value=0.1, target=0.5)
    values = run(sched, sp, 8)
    assert values == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.4, 0.4, 0.5, 0.5, 0.5])


def test_step_decays_to_floor_target():
    sp = make_sparsifier()
    sched = StepScheduler(sp, step_size=1, gamma=0.5, initial_value=0.8, target=0.15)
    assert run(sched, sp, 4) == pytest.approx([0.8, 0.4, 0.2, 0.15, 0.15])


def test_step_without_target_starts_from_config_and_clamps_level():
    sp = make_sparsifier(level=0.3, a={"sparsity_level": 0.3}, b={"sparsity_level": 0.45})
    sched = StepScheduler(sp, step_size=1, gamma=2.0)
    values = run(sched, sp, 3)
    assert values == pytest.approx([0.3, 0.6, 1.0, 1.0])
    assert levels(sp, "b") == 1.0
    sp.step()  # 1.0 is a valid level
    assert not sp.get_mask("a").any()


def _cubic(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta: the value changes at t0 + k*dt, clamped outside [t0, t0 + n*dt]."""
    if t < t0:
        return s_i
    k = min((t - t0) // dt, n)
    return s_f + (s_i - s_f) * (1 - k * dt / (n * dt)) ** 3


def test_cubic_formula_and_clamping():
    sp = make_sparsifier()
    s_i, s_f, t0, n, dt = 0.1, 0.9, 3, 4, 2
    sched = CubicScheduler(
        sp, initial_value=s_i, target=s_f, start_step=t0, total_steps=n, step_interval=dt
    )
    values = run(sched, sp, 16)
    # before t0: s_i
    assert values[:3] == pytest.approx([s_i] * 3)
    # at the pruning steps t0 + k dt, s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    for t in (3, 5, 7, 9, 11):
        formula = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert values[t] == pytest.approx(formula), t
    assert values[5] == pytest.approx(0.9 - 0.8 * 0.75**3)
    assert values[7] == pytest.approx(0.9 - 0.8 * 0.125)
    # between pruning steps it holds; after t0 + n dt it stays at s_f
    assert values[4] == values[3] and values[6] == values[5]
    assert values[11:] == pytest.approx([s_f] * 6)
    assert values == pytest.approx([_cubic(t, s_i, s_f, t0, n, dt) for t in range(17)])
    # fast at first, then slower
    jumps = [values[t + dt] - values[t] for t in (3, 5, 7, 9)]
    assert jumps == sorted(jumps, reverse=True) and all(j > 0 for j in jumps)


def test_cubic_default_interval_each_epoch():
    sp = make_sparsifier()
    sched = CubicScheduler(sp, initial_value=0.0, target=0.8, total_steps=5)
    values = run(sched, sp, 7)
    expected = [0.8 * (1 - (1 - min(t, 5) / 5) ** 3) for t in range(8)]
    assert values == pytest.approx(expected)
    sp.step()
    assert int((~sp.get_mask("a")).sum()) == round(0.8 * 20) * 4


# ------------------------------------------------------------------- per-name targets

SCHEDULES = [
    (ConstantScheduler, {}),
    (LinearScheduler, dict(total_steps=3, initial_value=0.0)),
    (StepScheduler, dict(step_size=1, gamma=2.0, initial_value=0.05)),
    (CubicScheduler, dict(total_steps=3, initial_value=0.0)),
]


@pytest.mark.parametrize(("cls", "kwargs"), SCHEDULES, ids=lambda x: getattr(x, "__name__", ""))
def test_per_name_targets_via_dict(cls, kwargs):
    sp = make_sparsifier(level=0.6, names=("a", "b.x", "c"))
    sched = cls(sp, target={"a": 0.3, "b.x": 0.8}, **kwargs)
    run(sched, sp, 12)
    assert levels(sp, "a") == pytest.approx(0.3)
    assert levels(sp, "b.x") == pytest.approx(0.8)
    assert levels(sp, "c") == pytest.approx(0.6)  # left out: its configured value


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [case for case in SCHEDULES if case[0] is not StepScheduler],  # StepLR-like: no target
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_per_name_targets_via_add_data_config(cls, kwargs):
    sp = make_sparsifier(
        level=0.5, names=("a", "b"), a={"sparsity_level": 0.2}, b={"sparsity_level": 0.9}
    )
    sched = cls(sp, target=None, **kwargs)
    run(sched, sp, 12)
    assert levels(sp, "a") == pytest.approx(0.2)
    assert levels(sp, "b") == pytest.approx(0.9)
    sp.step()
    assert int((~sp.get_mask("a")).sum()) == 4 * 4
    assert int((~sp.get_mask("b")).sum()) == 18 * 4


def test_step_per_name_start_from_add_data_config():
    sp = make_sparsifier(a={"sparsity_level": 0.1}, b={"sparsity_level": 0.2})
    sched = StepScheduler(sp, step_size=2, gamma=2.0, target={"a": 0.3, "b": 0.3})
    run(sched, sp, 2)
    assert (levels(sp, "a"), levels(sp, "b")) == pytest.approx((0.2, 0.3))


@pytest.mark.parametrize(("cls", "kwargs"), SCHEDULES, ids=lambda x: getattr(x, "__name__", ""))
def test_single_number_target_for_all(cls, kwargs):
    sp = make_sparsifier(level=0.5, a={"sparsity_level": 0.1})
    sched = cls(sp, target=0.7, **kwargs)
    run(sched, sp, 12)
    assert levels(sp, "a") == pytest.approx(0.7)
    assert levels(sp, "b") == pytest.approx(0.7)


def test_no_target_and_no_config_key_raises():
    sp = FirstRowSparsifier()
    sp.add_data("a", torch.randn(2, 2))
    with pytest.raises(ValueError, match="target"):
        LinearScheduler(sp, "sparsity_level", total_steps=2)


# ----------------------------------------------------------------------- invalid args

INVALID = [
    (LinearScheduler, dict(total_steps=-1)),
    (LinearScheduler, dict(total_steps=2.5)),
    (LinearScheduler, dict(initial_value=math.nan)),
    (LinearScheduler, dict(initial_value="0")),
    (LinearScheduler, dict(start_step=-1)),
    (LinearScheduler, dict(target="x")),
    (LinearScheduler, dict(target=math.nan)),
    (LinearScheduler, dict(target={"a": "x"})),
    (LinearScheduler, dict(target=True)),
    (StepScheduler, dict(step_size=0)),
    (StepScheduler, dict(gamma=0.0)),
    (StepScheduler, dict(gamma=-1.0)),
    (StepScheduler, dict(gamma=math.nan)),
    (StepScheduler, dict(initial_value=math.nan)),
    (CubicScheduler, dict(total_steps=0)),
    (CubicScheduler, dict(step_interval=0)),
    (CubicScheduler, dict(start_step=-2)),
    (CubicScheduler, dict(initial_value=None)),
    (ConstantScheduler, dict(target={"a": math.nan})),
    (ConstantScheduler, dict(schedule_param="")),
]


@pytest.mark.parametrize(("cls", "kwargs"), INVALID, ids=repr)
def test_invalid_args_raise_value_error(cls, kwargs):
    sp = make_sparsifier()
    before = copy.deepcopy(sp.data_groups)
    with pytest.raises(ValueError):
        cls(sp, **kwargs)
    assert sp.data_groups == before
