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


def torchrun(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2`` on a free port."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def launch(mode: str, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the worker in ``mode``; ``{(case, rank): result}`` from both ranks' files."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun([str(WORKER), mode, str(out)], cwd=out)
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


@pytest.mark.parametrize("case", [*CASES, "reversed_offsets"])
def test_each_rank_holds_its_rows_of_the_single_process_mask(cases, case):
    for rank in (0, 1):
        assert cases[(case, rank)]["ok"], cases[(case, rank)]


@pytest.mark.parametrize("case", list(BAD))
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


def test_a_rank_that_never_steps_is_a_timeout_line(tmp_path):
    proc, results = launch("missing-step", tmp_path)
    assert proc.returncode != 0
    message = results[("step", 0)]["message"]
    assert message.startswith("step: not all 2 processes joined within 3 s"), message
    assert "Ranks 1 failed" in message and "\n" not in message


def test_a_sharded_sparsifier_without_a_process_group_says_how_to_make_one():
    sp = ShardedMagnitudeSparsifier()  # built without one (the runner checks its config so)
    data = torch.ones(4, 3)
    with pytest.raises(ShardError, match="init_process_group"):
        sp.add_data("t", data)
    assert not sp.data_groups and torch.equal(data, torch.ones(4, 3))
    assert not torch.distributed.is_initialized()
