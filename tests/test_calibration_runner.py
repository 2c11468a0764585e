"""The runner's calibration group: batches and text through the model once before the first
step, statistics handed to the sparsifier, calibration/* metrics, and bad input (one line,
exit 2, before any run)."""

from __future__ import annotations

import pytest
import torch

from sparsify_exp import WandaSparsifier, collect
from sparsify_exp.masks import load_masks
from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.cli import compose_config
from sparsify_exp.runner.config import ConfigError
from sparsify_exp.runner.validate import validate

MLP = ["data=model", "data.module.sizes=[32,16,8]", "data.include=[*.weight]"]
QUIET = ["eval=[]", "output.progress=none", "mlflow.mask_images=0"]


def masks_of(store, run_id: str, tmp_path) -> dict[str, torch.Tensor]:
    local = store.client.download_artifacts(run_id, "masks/final.safetensors", str(tmp_path))
    return load_masks(local)


def test_wanda_with_batches_gets_the_library_masks(store, tmp_path):
    batches = "calibration.batches._target_=calibration_inputs.mlp_inputs"
    rid = run_overrides(
        [*MLP, "sparsifier=wanda", "calibration=batches", "~calibration.batches.batch_size",
         "~calibration.batches.batches", batches, *QUIET],
        output_dir=tmp_path / "job",
    )  # fmt: skip
    run = store.client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["calibration/batches"] == 4
    assert run.data.metrics["calibration/seconds"] > 0
    # the same model (same seed), the same batches, through the library
    from calibration_inputs import mlp_inputs

    from sparsify_exp.runner.data.mlp import MLP as Net

    torch.manual_seed(0)
    net = Net([32, 16, 8])
    stats = collect(net, mlp_inputs(), needs=("input_norms",))
    sp = WandaSparsifier(sparsity_level=0.5)
    for name, norms in stats.input_norms().items():
        sp.add_data(name, dict(net.named_parameters())[name], input_norms=norms)
    sp.step()
    got = masks_of(store, rid, tmp_path)
    assert set(got) == set(sp.data_groups)
    for name in got:
        assert torch.equal(got[name].bool(), sp.get_mask(name)), name


def test_text_calibration_tokenizes_with_the_models_tokenizer(store, tmp_path):
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("the model weight is a sparse table of the data " * 20)
    (texts / "sub" / "b.md").write_text("an input row and an output layer norm score " * 20)
    (texts / "skip.json").write_text("{}")
    from hf_models import tiny_bert

    rid = run_overrides(
        ["data=hf", f"data.path={tiny_bert(tmp_path / 'bert')}", "sparsifier=wanda",
         "sparsifier.n=2", "sparsifier.m=4", "calibration=text", f"calibration.texts={texts}",
         "calibration.max_samples=5", "calibration.seq_len=16", "calibration.batch_size=2",
         *QUIET],
        output_dir=tmp_path / "job",
    )  # fmt: skip
    run = store.client.get_run(rid)
    assert run.info.status == "FINISHED", run.data.tags.get("mlflow.note.content")
    assert run.data.metrics["calibration/tokens"] == 5 * 16  # full windows, no padding
    assert run.data.metrics["calibration/batches"] == 3
    assert run.data.metrics["sparsity/overall"] == pytest.approx(0.5)
    got = masks_of(store, rid, tmp_path)
    assert len(got) == 12  # q, k, v, out, intermediate, output of 2 layers
    for mask in got.values():  # 2 of every 4 input columns kept in every row
        assert torch.equal(
            mask.bool().view(mask.shape[0], -1, 4).sum(-1).unique(), torch.tensor([2])
        )


def test_dlrm_rows_by_usage_keep_the_most_looked_up_rows(store, tmp_path):
    from sparsify_exp.runner.examples.dlrm import calibration_batches

    rid = run_overrides(
        ["data=dlrm", "sparsifier=row_usage", "sparsifier.sparsity_level=0.9",
         "calibration=batches", "eval=[dlrm_auc]", "output.progress=none",
         "mlflow.mask_images=0"],
        output_dir=tmp_path / "job",
    )  # fmt: skip
    metrics = store.client.get_run(rid).data.metrics
    assert metrics["calibration/batches"] == 20
    assert metrics["rows/kept"] == pytest.approx(0.1 * 1700, abs=1)
    assert metrics["task/auc/sparse"] > 0.6
    masks = masks_of(store, rid, tmp_path)
    for table in range(3):
        ids = torch.cat([ids[table].reshape(-1) for _, ids in calibration_batches()])
        counts = torch.bincount(ids, minlength=masks[f"embeddings.{table}.weight"].shape[0])
        kept = masks[f"embeddings.{table}.weight"].bool().all(1)
        assert int(counts[kept].min()) >= int(counts[~kept].max())


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ([*MLP, "sparsifier=wanda"], "calibration=none: WandaSparsifier needs input_norms"),
        ([*MLP, "sparsifier=row_usage"], "calibration=none: RowSparsifier needs row_counts"),
        (
            [*MLP, "sparsifier=wanda", "calibration=text", "calibration.texts=[hello]"],
            "calibration._target_=sparsify_exp.runner.calibration.TextCalibration: "
            "calibration=text tokenizes with the model's tokenizer, and this data source "
            "(model) has none",
        ),
        (
            ["data=tensors", "sparsifier=wanda", "calibration=batches"],
            "this data source (tensors) holds tensors without one",
        ),
        (
            ["sparsifier=wanda", "calibration=text", "calibration.texts=/no/such/texts"],
            "calibration.texts=/no/such/texts: no such file or folder",
        ),
        (
            ["sparsifier=wanda", "calibration=text", "calibration.texts=[]"],
            "calibration.texts=[]: the list of texts is empty",
        ),
        (
            ["sparsifier=wanda", "calibration=text", "calibration.texts=['a', ' ']"],
            "calibration.texts=[a, ' ']: text [1] is empty",
        ),
        (
            ["sparsifier=wanda", "calibration=batches", "calibration.max_batches=0"],
            "calibration.max_batches=0: must be >= 1",
        ),
        (["sparsifier=row", "sparsifier.score=often"], "sparsifier.score=often: must be one of"),
    ],
)
def test_bad_calibration_input_is_one_line_before_any_run(overrides, line, store, tmp_path):
    problems = validate(compose_config([*overrides, *QUIET]))
    assert any(line in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(ConfigError):
        run_overrides([*overrides, *QUIET], output_dir=tmp_path / "job")
    assert store.runs() == []


def test_a_model_folder_without_tokenizer_is_refused_before_any_run(store, tmp_path):
    from hf_models import tiny_bert

    folder = tiny_bert(tmp_path / "bert", tokenizer=False)
    overrides = ["data=hf", f"data.path={folder}", "sparsifier=wanda", "calibration=text",
                 "calibration.texts=[some text]", *QUIET]  # fmt: skip
    problems = validate(compose_config(overrides))
    assert problems == [
        "calibration._target_=sparsify_exp.runner.calibration.TextCalibration: calibration=text "
        f"tokenizes with the model's tokenizer, and data.path={folder} has no tokenizer files: "
        "add them to the model folder, or use calibration=batches"
    ]
    with pytest.raises(ConfigError):
        run_overrides(overrides, output_dir=tmp_path / "job")
    assert store.runs() == []


def test_empty_text_file_and_empty_folder(store, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.json").write_text("{}")
    for path, says in ((tmp_path / "empty.txt", "is empty"), (tmp_path / "folder", "holds no")):
        problems = validate(
            compose_config(["sparsifier=wanda", "calibration=text", f"calibration.texts={path}"])
        )
        assert any(p.startswith(f"calibration.texts={path}: {says}") for p in problems), problems


def test_a_held_name_without_statistics_fails_the_run_with_the_reason(store, tmp_path):
    overrides = [
        "data=model", "data.module.sizes=[32,16,8]", "sparsifier=wanda", "calibration=batches",
        "calibration.batches._target_=calibration_inputs.mlp_inputs",
        "~calibration.batches.batch_size", "~calibration.batches.batches", *QUIET,
    ]  # fmt: skip
    with pytest.raises(ConfigError) as error:
        run_overrides(overrides, output_dir=tmp_path / "job")
    (problem,) = error.value.problems
    assert problem.startswith("sparsifier: WandaSparsifier needs input_norms for every name")
    assert "net.0.bias" in problem and "not the weight of an nn.Linear" in problem
    (run,) = store.runs()
    assert run.info.status == "FAILED"


def test_the_cli_exits_2_with_one_line(store, cli):
    result = cli(["data=model", "sparsifier=wanda", "eval=[]"], store.dir)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert lines == [
        "  calibration=none: WandaSparsifier needs input_norms from calibration data: add "
        "calibration=text (a language model with its tokenizer) or calibration=batches (model "
        "inputs from a _target_)"
    ]
    assert store.runs() == []
