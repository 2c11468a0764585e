"""Config composition and up-front validation: every option builds; every mistake is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from sparsify_exp.runner import compose_config
from sparsify_exp.runner.build import build
from sparsify_exp.runner.validate import validate

CONF = Path(__file__).resolve().parents[1] / "sparsify_exp" / "conf"
GROUPS = ["data", "sparsifier", "schedule", "per_name", "eval", "calibration"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _all_options() -> list[tuple[str, str]]:
    return [(g, o) for g in GROUPS for o in _options(g)]


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file(
        {
            "layer.weight": torch.randn(16, 8),
            "layer.bias": torch.randn(16),
            "steps": torch.tensor([3], dtype=torch.int64),
        },
        str(path),
    )
    return path


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), group
    assert {"tensors", "model", "embeddings", "file"} <= set(_options("data"))
    assert {"first_row", "data_norm"} <= set(_options("sparsifier"))
    assert {"once", "linear", "step", "cubic"} <= set(_options("schedule"))
    assert {"none", "example"} <= set(_options("per_name"))
    assert {"none", "batches", "text"} <= set(_options("calibration"))


# options that build only under torchrun, with a process group: tests/test_sharded.py
SHARDED = {
    ("data", "sharded"),
    ("sparsifier", "sharded_data_norm"),
    ("sparsifier", "sharded_magnitude"),
}


# options that rank by calibration data, and what they run with: a model and its batches
CALIBRATED = {
    "wanda": ["data=dlrm", "data.include=[bottom.*.weight]", "calibration=batches"],
    "row_usage": ["data=dlrm", "calibration=batches"],
    "batches": ["data=dlrm", "sparsifier=row_usage"],
    "text": ["data=hf", "sparsifier=wanda", "calibration.texts=[the model is a sparse table]"],
}


@pytest.mark.parametrize(("group", "option"), _all_options())
def test_every_option_composes_validates_and_builds(group, option, weights):
    overrides = [f"{group}=[{option}]" if group == "eval" else f"{group}={option}"]
    if (group, option) in SHARDED:
        pair = ["data=sharded"] if group == "sparsifier" else ["sparsifier=sharded_magnitude"]
        assert validate(compose_config([*overrides, *pair, f"data.path={weights}"])) == []
        return
    if option == "file":
        overrides.append(f"data.path={weights}")
    if group == "data" and option == "hf":
        from hf_models import tiny_bert

        overrides.append(f"data.path={tiny_bert(weights.parent / 'bert')}")
    if group == "eval" and option == "task":
        overrides.append("eval.task.fn=sparsify_exp.runner.examples.digits.accuracy")
    if group == "eval" and option in ("task", "digits_accuracy"):
        overrides.append("data=digits_mlp")  # the task example needs its model
    if group == "schedule":
        overrides.append("sparsifier=data_norm")
    calibrated = option in CALIBRATED
    if calibrated:
        overrides += CALIBRATED[option]
    if "data=hf" in overrides and not (group == "data" and option == "hf"):
        from hf_models import tiny_bert

        overrides.append(f"data.path={tiny_bert(weights.parent / 'bert')}")
    cfg = compose_config(overrides)
    assert validate(cfg) == []
    if calibrated:  # statistics from the model: the runner's build runs the batches
        built = build(cfg, [], 0)
        assert built.calibration["calibration/seconds"] > 0
        built.sparsifier.step()
        return

    bundle = instantiate(cfg.data, _convert_="all")
    assert bundle.named_data
    sp = instantiate(cfg.sparsifier, _convert_="all")
    for name, obj in bundle.named_data.items():
        sp.add_data(name, obj)
    if cfg.schedule.scheduler is not None:
        instantiate(cfg.schedule.scheduler, data_sparsifier=sp, _convert_="all")
    for node in (cfg.get("eval") or {}).values():
        assert instantiate(node, _convert_="all") is not None
    sp.step()
    if group == "eval":
        # each option lives under eval.<name> (its `# @package eval.<name>` line)
        assert len(cfg.eval) == 1


def test_several_evaluators_coexist():
    cfg = compose_config(["eval=[fidelity,embedding_bag]", "data=embeddings"])
    assert list(cfg.eval) == ["fidelity", "embedding_bag"]
    assert validate(cfg) == []
    assert "eval" not in compose_config(["eval=[]"]) or not compose_config(["eval=[]"]).eval


MISTAKES = [
    (["sparsifier.sparsity_level=1.5"], "sparsifier.sparsity_level=1.5: must be in [0, 1]"),
    (["sparsifier.sparsity_level=abc"], "sparsifier.sparsity_level=abc: must be a number"),
    (["sparsifier.norm=L3"], "sparsifier.norm=L3: must be one of: L1, L2"),
    (
        ["sparsifier.sparse_block_shape=[1,2,3]"],
        "sparsifier.sparse_block_shape=[1, 2, 3]: must have 2 entries",
    ),
    (
        ["sparsifier.zeros_per_block=5"],
        "sparsifier.zeros_per_block=5: must be <= 4, the entries of a 1x4 block",
    ),
    (
        ["+sparsifier.colour=red"],
        "sparsifier.colour=red: not an argument of DataNormSparsifier "
        "(allowed: sparsity_level, sparse_block_shape, zeros_per_block, norm, scope)",
    ),
    (
        ["sparsifier=first_row", "+sparsifier.sparsity_level=2"],
        "sparsifier.sparsity_level=2: not an argument of FirstRowSparsifier (allowed: none)",
    ),
    (
        ["sparsifier._target_=sparsify_exp.NoSuchSparsifier"],
        "sparsifier._target_=sparsify_exp.NoSuchSparsifier: cannot import",
    ),
    (["data=file"], "data.path=???: required: set it on the command line (data.path=...)"),
    (["data=file", "data.path=model.onnx"], "data.path=model.onnx: must end in one of:"),
    (["data=file", "data.path=missing.pt"], "data.path=missing.pt: no such file"),
    (
        ["data.dtype=int8"],
        "data.dtype=int8: must be one of: float32, float64, float16, bfloat16",
    ),
    (["data.tensors.0.shape=[0,4]"], "data.tensors[0].shape=[0, 4]: every entry must be >= 1"),
    (
        ["data=embeddings", "data.tables.0.embedding_dim=-1"],
        "data.tables[0].embedding_dim=-1: must be >= 1",
    ),
    (["schedule.steps=0"], "schedule.steps=0: must be >= 1"),
    (
        ["schedule=cubic", "schedule.steps=1"],
        "schedule.steps=1: a cubic schedule with start_step=0, step_interval=1 needs steps >= 2",
    ),
    (
        ["schedule=linear", "schedule.scheduler.target=2"],
        "schedule.scheduler.target=2: must be in [0, 1]",
    ),
    (["schedule=step", "schedule.scheduler.gamma=0"], "schedule.scheduler.gamma=0: must be > 0"),
    (["mlflow.log_every=0"], "mlflow.log_every=0: must be >= 1"),
    (
        ["sparsifier=first_row", "schedule=linear"],
        "schedule.scheduler.schedule_param=sparsity_level: FirstRowSparsifier has no such "
        "config key to schedule (its keys: none); use schedule=once or another sparsifier",
    ),
    (["mlflow.experiment=''"], "mlflow.experiment='': must not be empty"),
    (["output.progress=fancy"], "output.progress=fancy: must be one of: auto, bar, log, none"),
    (
        ["per_name=example", "per_name.rules.1.config.sparsity_level=7"],
        "per_name.rules[1].config.sparsity_level=7: must be in [0, 1]",
    ),
    (
        ["per_name=example", "+per_name.rules.1.config.speed=9"],
        "per_name.rules[1].config.speed=9: not a config key of DataNormSparsifier",
    ),
    (["eval=[task]"], "eval.task.fn=???: required"),
    (["seed=x"], "seed=x: must be an integer"),
]


@pytest.mark.parametrize(("overrides", "expected"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_each_mistake_gives_its_one_line(overrides, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = validate(compose_config(overrides))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems
    assert "\n" not in problems[0]


def test_include_that_selects_nothing_is_a_config_error(weights):
    cfg = compose_config(["data=file", f"data.path={weights}", "data.include=[encoder.*]"])
    (problem,) = validate(cfg)
    assert problem.startswith("data.include=[encoder.*]: with data.exclude=[] selects no floating")
    assert "layer.weight" in problem


def test_unknown_option_lists_the_available_ones():
    with pytest.raises(
        Exception, match=r"(?s)Could not find 'sparsifier/nope'.*data_norm.*first_row"
    ):
        compose_config(["sparsifier=nope"])


def test_cli_reports_all_problems_at_once_without_traceback(store, cli):
    proc = cli(
        [
            "sparsifier.sparsity_level=1.5",
            "sparsifier.norm=L3",
            "schedule.steps=0",
            "data=file",
            "data.path=nowhere.safetensors",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "invalid configuration (4 problems):"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "sparsifier.sparsity_level=1.5: must be in [0, 1]",
            "sparsifier.norm=L3: must be one of: L1, L2",
            "schedule.steps=0: must be >= 1",
            f"data.path=nowhere.safetensors: no such file ({store.dir / 'nowhere.safetensors'})",
        ]
    )
    assert store.runs() == []  # nothing was started


def test_sweep_with_a_bad_job_stops_before_any_job_runs(store, cli):
    proc = cli(["-m", "sparsifier.sparsity_level=0.5,1.5", "eval=[]"], cwd=store.dir)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "invalid configuration (1 problem):",
        "  sparsifier.sparsity_level=1.5: must be in [0, 1]",
    ]
    assert store.runs() == []


def test_rejected_config_leaves_no_output_folder(store, cli):
    proc = cli(["sparsifier.sparsity_level=2", "+colour=red"], cwd=store.dir)
    assert proc.returncode == 2, proc.stderr
    colour, level = sorted(proc.stderr.strip().splitlines()[1:])
    assert colour.startswith("  colour=red: unknown key (allowed: seed, ")
    assert all(k in colour for k in ("mlflow", "schedule", "sparsifier", "eval"))
    assert level == "  sparsifier.sparsity_level=2: must be in [0, 1]"
    assert not (store.dir / "outputs").exists()
    assert store.runs() == []


def test_run_dir_that_cannot_be_made_is_one_line(store, cli):
    (store.dir / "a_file").write_text("")
    proc = cli(["hydra.run.dir=a_file/run", "eval=[]"], cwd=store.dir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("cannot be created (Not a directory)")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("foo://x", "mlflow.tracking_uri=foo://x: must be a tracking URI"),
        ("sqlite:////no/such/dir/m.db", "mlflow.tracking_uri=sqlite:////no/such/dir/m.db: no such"),
    ],
)
def test_bad_tracking_uri_is_one_line(uri, expected):
    (problem,) = validate(compose_config([f"mlflow.tracking_uri={uri}"]))
    assert problem.startswith(expected)


def test_oversized_numbers_are_config_errors():
    problems = validate(
        compose_config(["seed=99999999999999999999999", "schedule.steps=99999999999999999999999"])
    )
    assert sorted(problems) == [
        "schedule.steps=99999999999999999999999: must be <= 10000000",
        "seed=99999999999999999999999: must be <= 18446744073709551615",
    ]


def test_per_name_levels_under_a_global_scope_are_a_config_error():
    problems = validate(
        compose_config(
            [
                "sparsifier=magnitude",
                "sparsifier.scope=global",
                "+per_name.rules=[{pattern: '*', config: {sparsity_level: 0.3}}]",
            ]
        )
    )
    assert problems == [
        "per_name.rules[0].config.sparsity_level=0.3: sparsifier.scope=global uses one level "
        "for every name: set sparsifier.sparsity_level, or skip the name"
    ]


def test_per_name_rules_that_skip_every_name_are_a_config_error(weights):
    for overrides in (
        ["+per_name.rules=[{pattern: '*', skip: true}]"],
        ["data=file", f"data.path={weights}", "+per_name.rules=[{pattern: 'layer.*', skip: true}]"],
    ):
        (problem,) = validate(compose_config(overrides))
        assert problem.endswith("nothing left to sparsify"), problem
    assert validate(compose_config(["+per_name.rules=[{pattern: '*.bias', skip: true}]"])) == []
