"""Checkpoints with nothing to sparsify are config errors naming the file and what it holds;
0-size tensors beside real ones are written as they are and listed in per_name.csv."""

from __future__ import annotations

import csv

import torch
from safetensors.torch import save_file

from sparsify_exp.runner import compose_config, run_overrides
from sparsify_exp.runner.validate import validate


def _problems(path) -> list[str]:
    return validate(compose_config(["data=file", f"data.path={path}"]))


def test_only_0_size_tensors_is_a_config_error_naming_the_file(tmp_path):
    st = tmp_path / "empty.safetensors"
    save_file({"a.w": torch.zeros(0, 4), "b.w": torch.zeros(0)}, str(st))
    pt = tmp_path / "empty.pt"
    torch.save({"a.w": torch.zeros(0, 4)}, pt)
    for path in (st, pt):
        (problem,) = _problems(path)
        assert problem.startswith(f"data.path={path}: {path} holds no floating tensor")
        assert "a.w float" in problem and "0x4" in problem and "\n" not in problem


def test_a_pt_holding_a_list_is_a_config_error_saying_so(tmp_path, store, cli):
    pt = tmp_path / "list.pt"
    torch.save([torch.randn(4, 4), torch.randn(4)], pt)
    (problem,) = _problems(pt)
    assert problem == (
        f"data.path={pt}: {pt} holds a list of 2 tensors, not tensors by name; save a dict "
        "(a state_dict: name -> tensor)"
    )
    done = cli(["data=file", f"data.path={pt}"], tmp_path)
    assert done.returncode == 2  # before any run
    assert "holds a list of 2 tensors" in done.stderr and "Traceback" not in done.stderr
    assert store.runs() == []


def test_0_size_tensors_beside_real_ones_are_listed_in_per_name_csv(tmp_path, store):
    st = tmp_path / "mixed.safetensors"
    save_file({"w": torch.randn(8, 8), "empty": torch.zeros(0, 8)}, str(st))
    run_overrides(["data=file", f"data.path={st}"], output_dir=tmp_path / "job")
    with (tmp_path / "job" / "artifacts" / "per_name.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["w"]["sparsified"] == "True"
    assert rows["empty"]["kind"] == "empty" and rows["empty"]["shape"] == "0x8"
    assert rows["empty"]["numel"] == "0" and rows["empty"]["sparsified"] == "False"
