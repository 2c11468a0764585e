"""Sweeps beyond Hydra's basic sweeper: which jobs are validated up front, and an optuna search
end to end (parent run, child runs, report, the best trial) against a real sqlite store."""

from __future__ import annotations

import csv

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sparsify_exp.runner import compose_config
from sparsify_exp.runner.sweep.callback import MAX_SAMPLED_JOBS, expand_jobs
from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps
from sparsify_exp.runner.validate import validate

OPTUNA = ["hydra/sweeper=optuna"]


def _sweep_config(sweeper: list[str], task: list[str], params: dict | None = None) -> DictConfig:
    """The multirun config a sweep callback gets: ``task`` as typed, ``params`` in the sweeper."""
    cfg = compose_config(sweeper, hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = task
        cfg.hydra.sweeper.params = params
    return cfg


def _jobs(jobs: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset(job) for job in jobs}


# --------------------------------------------------------------------------- expand_jobs


def test_basic_sweep_expands_to_the_cartesian_product_with_sweeper_params():
    cfg = _sweep_config(
        [],
        ["sparsifier.sparsity_level=0.2,0.5", "data=tensors", "schedule=once,linear"],
        {"sparsifier.norm": "L1,L2", "seed": "1,2"},
    )
    jobs, complete = expand_jobs(cfg)
    assert complete
    assert len(jobs) == 2 * 2 * 2 * 2
    assert _jobs(jobs) == {
        frozenset({f"sparsifier.norm={n}", f"seed={s}", f"sparsifier.sparsity_level={lvl}"})
        | {"data=tensors", f"schedule={sched}"}
        for n in ("L1", "L2")
        for s in (1, 2)
        for lvl in (0.2, 0.5)
        for sched in ("once", "linear")
    }


def test_basic_sweep_command_line_wins_over_sweeper_params():
    cfg = _sweep_config([], ["seed=7"], {"seed": "1,2,3"})
    assert expand_jobs(cfg) == ([["seed=7"]], True)


def test_other_sweeper_samples_each_choice_a_range_s_ends_and_an_interval_s_ends():
    cfg = _sweep_config(
        OPTUNA,
        [
            "sparsifier.sparsity_level=interval(0.05,0.99)",
            "data=tensors",
            "+objective.max={fidelity/rel_error: 0.5}",
            "seed=range(0,100)",
        ],
        {"sparsifier.norm": "choice(L1,L2)"},
    )
    jobs, complete = expand_jobs(cfg)
    assert not complete
    assert _jobs(jobs) == {
        frozenset(
            {
                f"sparsifier.norm={n}",
                f"sparsifier.sparsity_level={lvl}",
                f"seed={s}",
                "data=tensors",
                "+objective.max={fidelity/rel_error:0.5}",
            }
        )
        for n in ("L1", "L2")
        for lvl in (0.05, 0.99)
        for s in (0, 99)
    }


def test_other_sweeper_without_sweep_overrides_validates_the_common_ones():
    cfg = _sweep_config(OPTUNA, ["data=tensors", "sparsifier.sparsity_level=0.3"])
    assert expand_jobs(cfg) == ([["data=tensors", "sparsifier.sparsity_level=0.3"]], False)


def test_other_sweeper_samples_a_required_key_it_sweeps():
    # validating the common overrides alone would flag data.path=??? (required)
    cfg = _sweep_config(OPTUNA, ["data=file", "data.path=choice(a.pt,b.pt)"])
    jobs, _ = expand_jobs(cfg)
    assert _jobs(jobs) == {
        frozenset({"data=file", "data.path=a.pt"}),
        frozenset({"data=file", "data.path=b.pt"}),
    }


def test_other_sweeper_with_many_swept_keys_uses_each_value_at_least_once():
    task = [f"+k{i}=choice(a,b)" for i in range(6)]  # 64 combinations
    assert MAX_SAMPLED_JOBS < 2**6
    jobs, complete = expand_jobs(_sweep_config(OPTUNA, task))
    assert not complete
    assert _jobs(jobs) == {frozenset(f"+k{i}={v}" for i in range(6)) for v in ("a", "b")}


def test_other_sweeper_with_its_own_param_syntax_skips_up_front_jobs():
    cfg = _sweep_config([], ["data=tensors"])
    with read_write(cfg), open_dict(cfg):  # nevergrad's form of a scalar parameter
        cfg.hydra.sweeper = {
            "_target_": "hydra_plugins.hydra_nevergrad_sweeper.nevergrad_sweeper.NevergradSweeper",
            "params": {"sparsifier.sparsity_level": {"lower": 0.1, "upper": 0.9}},
        }
    assert expand_jobs(cfg) == ([], False)


def test_objective_node_problems_are_config_errors():
    good = compose_config(["+objective.max={fidelity/rel_error: 0.5}"])
    assert validate(good) == []
    bad = compose_config(
        ["objective.metric=''", "objective.infeasible=low", "+objective.max={a/b: high}"]
    )
    assert sorted(validate(bad)) == [
        "objective.infeasible=low: must be a number",
        "objective.max.a/b=high: must be a number",
        "objective.metric='': must not be empty",
    ]


# --------------------------------------------------------------------------- optuna, end to end

LEVEL = "sparsifier.sparsity_level"
BOUND = 0.6
FAST = ["mlflow.mask_images=0", "mlflow.log_data=false", "output.write_data=false"]


def test_optuna_search_highest_level_under_a_fidelity_bound(store, cli):
    proc = cli(
        [
            "-m",
            *OPTUNA,
            "hydra.sweeper.n_trials=6",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweep.dir=sweep",
            f"{LEVEL}=interval(0.05,0.99)",
            f"+objective.max={{fidelity/rel_error: {BOUND}}}",
            "data=tensors",
            *FAST,
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = store.client
    (parent,) = find_sweeps(client, "sparsify_exp")
    parent, children = find_sweep_runs(client, parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sparsify.sweep"] == "true"
    assert parent.data.tags["sparsify.jobs"] == "6"
    assert parent.data.tags["sparsify.sweeper"] == "OptunaSweeper"
    assert len(store.runs()) == 7
    assert len(children) == 6
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        level = float(child.data.params[LEVEL])
        assert 0.05 <= level <= 0.99
        assert child.data.metrics["sparsity/overall"] == pytest.approx(level, abs=0.01)

    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/sweep_report.csv", "report/optimization_results.yaml"} <= arts
    table = client.download_artifacts(parent.info.run_id, "report/sweep_report.csv", str(store.dir))
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in rows) == sorted(c.info.run_id for c in children)

    results = OmegaConf.load(store.dir / "sweep" / "optimization_results.yaml")
    logged = client.download_artifacts(
        parent.info.run_id, "report/optimization_results.yaml", str(store.dir / "logged")
    )
    assert OmegaConf.load(logged) == results
    feasible = [c for c in children if c.data.metrics["fidelity/rel_error"] <= BOUND]
    assert feasible and len(feasible) < len(children)  # the bound rules trials out
    (best,) = [
        c
        for c in children
        if float(c.data.params[LEVEL]) == pytest.approx(results.best_params[LEVEL], rel=1e-12)
    ]
    assert best in feasible
    assert float(best.data.params[LEVEL]) == max(float(c.data.params[LEVEL]) for c in feasible)
    assert results.best_value == pytest.approx(best.data.metrics["sparsity/overall"])


def test_optuna_search_with_an_invalid_interval_end_stops_before_any_run(store, cli):
    proc = cli(
        ["-m", *OPTUNA, "hydra.sweeper.n_trials=2", f"{LEVEL}=interval(0.5,1.5)"],
        cwd=store.dir,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{LEVEL}=1.5: must be in [0, 1]" in proc.stderr
    assert "the sweeper could launch" in proc.stderr
    assert store.runs() == []


def test_sweep_runs_are_named_by_what_varies(store, cli):
    proc = cli(
        [
            "-m",
            "sparsifier.sparsity_level=0.2,0.5",
            "sparsifier.sparse_block_shape=[1,1],[1,4]",
            "eval=[]",
            "mlflow.mask_images=0",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(r.info.run_name for r in store.runs())
    assert names == [
        "level=0.2 block=1x1",
        "level=0.2 block=1x4",
        "level=0.5 block=1x1",
        "level=0.5 block=1x4",
        "sweep data_norm on tensors: level 0.2,0.5 x block [1,1],[1,4]",
    ]
