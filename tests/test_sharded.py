"""Sharded tables under ``torchrun --nproc-per-node 2`` (gloo, CPU): each rank's mask equals
its rows of the single-process mask, ties included; bad layouts and missing ranks fail with
one line. The ranks run ``tests/sharded_worker.py``; each launch takes a few seconds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsify_exp.sparsifier.sharded import ShardedMagnitudeSparsifier, ShardError

WORKER = Path(__file__).with_name("sharded_worker.py")
sys.path.insert(0, str(WORKER.parent))
from sharded_worker import BAD, CASES  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: list[str], cwd: Path, timeout: int = 180, nproc: int = 2
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node <nproc>`` on a free port."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def launch(mode: str, out: Path, nproc: int = 2) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the worker in ``mode``; ``{(case, rank): result}`` from the ranks' files."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun([str(WORKER), mode, str(out)], cwd=out, nproc=nproc)
    results = {}
    for path in out.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            results[(row["case"], row["rank"])] = row
    return proc, results


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    proc, results = launch("cases", tmp_path_factory.mktemp("sharded_cases"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    proc, results = launch("bad", tmp_path_factory.mktemp("sharded_bad"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("case", [*CASES, "reversed_offsets", "pickle_and_state_dict"])
def test_each_rank_holds_its_rows_of_the_single_process_mask(cases, case):
    for rank in (0, 1):
        assert cases[(case, rank)]["ok"], cases[(case, rank)]


@pytest.mark.parametrize("case", [*BAD, "levels_differ_at_step"])
def test_a_layout_that_is_not_one_table_fails_on_every_rank_in_one_line(bad, case):
    for rank in (0, 1):
        result = bad[(case, rank)]
        assert result["ok"], result
        assert result["untouched"], result
    assert bad[(case, 0)]["message"] == bad[(case, 1)]["message"]


def test_the_ranks_still_step_together_after_refused_layouts(bad):
    for rank in (0, 1):
        assert bad[("in_step_after_errors", rank)]["ok"]


def test_a_rank_that_never_joins_the_group_is_a_timeout_line(tmp_path):
    proc, results = launch("missing-init", tmp_path)
    assert proc.returncode != 0
    message = results[("init", 0)]["message"]
    assert message.startswith("process group: not all 2 ranks joined within 3 s"), message
    assert "\n" not in message


def test_a_rank_that_never_steps_is_a_timeout_line(bad):
    assert bad[("never_steps", 0)]["ok"], bad[("never_steps", 0)]
    message = bad[("never_steps", 0)]["message"]
    assert message.startswith("step: not all 2 processes joined within 3 s"), message
    assert "Ranks 1 failed" in message and "\n" not in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl)")
def test_one_gpu_rank_on_nccl_gives_the_single_process_masks(tmp_path):
    proc, results = launch("cuda", tmp_path, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in CASES:
        assert results[(case, 0)]["ok"], results[(case, 0)]


def test_a_sharded_sparsifier_without_a_process_group_says_how_to_make_one():
    sp = ShardedMagnitudeSparsifier()  # built without one (the runner checks its config so)
    data = torch.ones(4, 3)
    with pytest.raises(ShardError, match="init_process_group"):
        sp.add_data("t", data)
    assert not sp.data_groups and torch.equal(data, torch.ones(4, 3))
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------- the runner


def _file_tables() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "emb.user": torch.randint(0, 4, (37, 16), generator=gen).float(),  # many tied blocks
        "emb.item": torch.randn(20, 8, generator=gen),
        "step": torch.tensor([3]),
    }


@pytest.mark.slow
def test_a_sharded_run_writes_the_single_process_result_and_logs_every_rank(store):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsify_exp import DataNormSparsifier

    tables = _file_tables()
    save_file(tables, str(store.dir / "model.safetensors"))
    proc = torchrun(
        [
            "-m",
            "sparsify_exp",
            "data=sharded",
            "data.path=model.safetensors",
            "sparsifier=sharded_data_norm",
            "sparsifier.sparse_block_shape=[2,4]",
            "sparsifier.sparsity_level=0.6",
            "mlflow.mask_images=0",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    ref = DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(2, 4))
    for name in ("emb.user", "emb.item"):
        ref.add_data(name, tables[name].clone())
    ref.step()
    kept = sum(int(ref.get_mask(n).sum()) for n in ref.data_groups)
    ref.squash_mask()

    shards = {}
    for path in store.dir.glob("outputs/*/*/artifacts/data/sparsified.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            shards[int(meta["sparsify.rank"])] = ({k: f.get_tensor(k) for k in f.keys()}, meta)  # noqa: SIM118
    assert sorted(shards) == [0, 1]
    for name in ("emb.user", "emb.item"):
        whole = torch.cat([shards[0][0][name], shards[1][0][name]])
        assert torch.equal(whole, ref.get_data(name, return_original=False)), name
    assert "step" in shards[0][0] and "step" not in shards[1][0]  # the dense rest, once
    assert json.loads(shards[1][1]["sparsify.shards"])["emb.user"] == [20, 37, 37]  # 2-row align

    runs = sorted(store.runs(), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in runs] == [
        "sharded_data_norm-sharded-rank0",
        "sharded_data_norm-sharded-rank1",
    ]
    assert all(r.data.tags.get("sparsify.shard.group") for r in runs)
    assert len({r.data.tags["sparsify.shard.group"] for r in runs}) == 1
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["sparsify.shard.world_size"] == "2"
        assert run.data.metrics["table/kept"] == kept
        assert run.data.metrics["table/sparsity"] == pytest.approx(1 - kept / (37 * 16 + 20 * 8))


def test_data_sharded_with_a_sparsifier_that_steps_shards_alone_is_a_config_line(tmp_path):
    from safetensors.torch import save_file

    from sparsify_exp.runner import compose_config
    from sparsify_exp.runner.validate import validate

    path = tmp_path / "model.safetensors"
    save_file(_file_tables(), str(path))
    problems = validate(compose_config(["data=sharded", f"data.path={path}"]))
    assert len(problems) == 1
    assert problems[0].startswith("data.sparsifier_target=sparsify_exp.DataNormSparsifier")
    assert "sparsifier=sharded_data_norm" in problems[0]
    ok = ["data=sharded", f"data.path={path}", "sparsifier=sharded_data_norm"]
    assert validate(compose_config([*ok, "sparsifier.sparse_block_shape=[4,4]"])) == []
    assert compose_config([*ok, "sparsifier.sparse_block_shape=[4,4]"]).data.row_align == 4
    assert "table" in compose_config(ok).eval  # the whole tables' sparsity, always


def test_data_sharded_outside_torchrun_says_how_to_launch_it(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from sparsify_exp.runner.data import sharded

    path = tmp_path / "model.safetensors"
    save_file(_file_tables(), str(path))
    monkeypatch.delenv("RANK", raising=False)
    target = "sparsify_exp.ShardedMagnitudeSparsifier"
    with pytest.raises(ValueError, match="launch it with torchrun"):
        sharded.build(str(path), sparsifier_target=target)


@pytest.mark.parametrize(
    ("rows", "world", "align", "expected"),
    [
        (37, 2, 2, [(0, 20), (20, 37)]),
        (10, 2, 1, [(0, 5), (5, 10)]),
        (5, 4, 2, [(0, 2), (2, 4), (4, 5), (5, 5)]),
        (3, 2, 4, [(0, 3), (3, 3)]),
    ],
)
def test_each_rank_reads_its_even_part_of_the_rows(rows, world, align, expected):
    from sparsify_exp.runner.data.sharded import shard_rows

    assert [shard_rows(rows, r, world, align) for r in range(world)] == expected
