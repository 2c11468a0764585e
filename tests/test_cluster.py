"""Sweeps beyond one process, for real: a Ray cluster on loopback (``hydra/launcher=ray``),
submitit jobs in their own processes (``submitit_local``, the code path of Slurm), and a
PostgreSQL-backed ``mlflow server`` (``scripts/tracking_server.sh``); and the one-line errors
when a launcher is not installed or a cluster or server does not answer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import warm_cli
from services import RAY_LOOPBACK_ENV, free_port, ray_head, tracking_server

from sparsify_exp.runner.tracking.store import find_sweep_runs, find_sweeps

STEPS = 4
#: Small jobs: the launchers' own work is what these tests are about.
JOB = [
    "data=tensors",
    "schedule=constant",
    f"schedule.steps={STEPS}",
    "eval=[]",
    "mlflow.mask_images=0",
    "output.progress=none",
]


def levels(n: int) -> str:
    return "sparsifier.sparsity_level=" + ",".join(f"{(i + 1) / (n + 1):.3f}" for i in range(n))


def sweep_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSIFY_EXP_")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("RAY_ADDRESS", None)
    env.update(MLFLOW_TRACKING_URI=tracking_uri, **RAY_LOOPBACK_ENV, **extra)
    return env


def run_sweep(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 480):
    return warm_cli.run("sparsify_exp", ["-m", *args], cwd, env, timeout=timeout)


def check_sweep(
    client, n_jobs: int, launcher: str, tmp: Path, out: str, experiment: str = "sparsify_exp"
) -> None:
    """One FINISHED parent with its report, ``n_jobs`` FINISHED children, each with every
    per-step metric at every step exactly once, and nothing left to upload."""
    (parent,) = find_sweeps(client, experiment)
    parent, children = find_sweep_runs(client, parent.info.run_id)
    assert parent.info.status == "FINISHED", out[-3000:]
    tags = parent.data.tags
    assert tags["sparsify.launcher"] == launcher
    assert (tags["sparsify.jobs"], tags["sparsify.jobs_finished"]) == (str(n_jobs), str(n_jobs))
    assert tags["sparsify.jobs_failed"] == "0"
    assert len(children) == n_jobs
    exp = client.get_experiment(parent.info.experiment_id)
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == n_jobs + 1
    per_step = None
    for child in children:
        rid = child.info.run_id
        assert child.info.status == "FINISHED", child.data.tags.get("sparsify.failure")
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        keys = sorted(k for k in child.data.metrics if k.startswith(("sparsity/", "schedule/")))
        assert per_step in (None, keys)  # every job logs the same keys
        per_step = keys
        for key in keys:
            steps = [m.step for m in client.get_metric_history(rid, key)]
            assert sorted(steps) == list(range(STEPS)), (rid, key, steps)
        churn = [m.step for m in client.get_metric_history(rid, "churn/overall")]
        assert sorted(churn) == list(range(1, STEPS)), (rid, churn)
        level = float(child.data.params["sparsifier.sparsity_level"])
        assert child.data.metrics["sparsity/overall"] == pytest.approx(level, abs=0.01)
    assert per_step is not None and len(per_step) >= 5 + 3  # summary keys + one per name
    report = client.download_artifacts(parent.info.run_id, "report/sweep_report.csv", str(tmp))
    with open(report) as f:
        assert len(list(csv.DictReader(f))) == n_jobs
    assert not list(tmp.glob("multirun/**/spool")), "a job left records it did not upload"
    assert "Traceback" not in out


# --------------------------------------------------------------------------- launchers


@pytest.mark.slow
def test_ray_sweep_on_a_local_cluster(store, tmp_path):
    """4 jobs as Ray tasks on a 2-CPU head node the launcher joins by address."""
    with ray_head(tmp_path / "ray.log") as head:
        proc = run_sweep(
            ["hydra/launcher=ray", f"hydra.launcher.address={head.address}", *JOB, levels(4)],
            store.dir,
            sweep_env(store.uri),
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Ray launcher: 4 jobs on 1 Ray node(s), 2 CPUs" in out
    check_sweep(store.client, 4, "RayLauncher", store.dir, out)
    assert len(list(store.dir.glob("multirun/*/*/[0-3]/artifacts/masks/final.safetensors"))) == 4


def test_submitit_sweep_finds_its_parent_by_the_sweep_folder(store):
    """2 jobs in their own processes (submitit's local executor, Slurm's code path), with the
    sweep's environment variable blanked in the jobs as when a cluster does not export it:
    each finds its parent run by the shared sweep folder."""
    proc = run_sweep(
        [
            "hydra/launcher=slurm_local",
            "+hydra.job.env_set.SPARSIFY_EXP_PARENT_RUN=none",
            *JOB,
            levels(2),
        ],
        store.dir,
        sweep_env(store.uri),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    check_sweep(store.client, 2, "LocalLauncher", store.dir, out)
    job_logs = list(store.dir.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert len(job_logs) == 2  # one submitit job (one process) each
    pids = {p.name.split("_")[0] for p in job_logs}
    assert len(pids) == 2


@pytest.mark.slow
def test_submitit_local_sweep_of_four_jobs(store):
    proc = run_sweep(
        ["hydra/launcher=submitit_local", *JOB, levels(4)], store.dir, sweep_env(store.uri)
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    check_sweep(store.client, 4, "LocalLauncher", store.dir, out)


@pytest.mark.slow
def test_postgres_tracking_server_loses_nothing_from_joblib_and_ray(tmp_path):
    """8 jobs, 4 at a time (joblib), against mlflow server on PostgreSQL: every child
    FINISHED with every step of every metric once; then the same sweep as Ray tasks against
    the same server, in a second experiment."""
    with tracking_server() as server:
        env = sweep_env(server.uri)
        joblib_dir = tmp_path / "joblib"
        joblib_dir.mkdir()
        proc = run_sweep(
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *JOB, levels(8)], joblib_dir, env
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "ERROR" not in out and "unreachable" not in out
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        check_sweep(client, 8, "JoblibLauncher", joblib_dir, out)

        ray_dir = tmp_path / "ray"
        ray_dir.mkdir()
        with ray_head(tmp_path / "ray.log") as head:
            proc = run_sweep(
                [
                    "hydra/launcher=ray",
                    f"hydra.launcher.address={head.address}",
                    "mlflow.experiment=on_ray",
                    *JOB,
                    levels(8),
                ],
                ray_dir,
                env,
            )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "ERROR" not in out and "unreachable" not in out
        check_sweep(client, 8, "RayLauncher", ray_dir, out, experiment="on_ray")
        assert server.script("status").returncode == 0  # still up: nothing crashed it
    assert server.script("status").returncode == 3  # and stopped


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["slurm", "slurm_local", "ray_cluster", "ray", "submitit_local"])
def test_launcher_configs_compose_and_build(name):
    """Each shipped example composes, and its launcher is built from it as Hydra builds it;
    the Slurm one's settings are ones submitit's Slurm executor accepts."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from sparsify_exp.runner import compose_config

    cfg = compose_config([f"hydra/launcher={name}"], hydra_config=True)
    settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = get_class(settings.pop("_target_"))(**settings)
    assert launcher is not None
    if name == "slurm":
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        assert settings["cpus_per_task"] == 4 and settings["mem_gb"] == 16
        assert "partition" in settings and settings["timeout_min"] == 60
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        slurm_keys = set(settings) - common - {"max_num_timeout"}
        assert slurm_keys <= set(submitit.SlurmExecutor._valid_parameters())  # as sbatch takes them
    if name == "ray_cluster":
        assert settings["num_cpus"] == 4 and settings["memory"] == 16 << 30


# --------------------------------------------------------------------------- bad input


def _cli_without(module: str, args: list[str], cwd: Path, env: dict[str, str]):
    """``python -m sparsify_exp *args`` in a Python where ``module`` cannot be imported."""
    return warm_cli.run("sparsify_exp", args, cwd, env, timeout=120, blocked=[module])


@pytest.mark.parametrize(
    ("launcher", "module"),
    [
        ("ray", "ray"),
        ("ray_cluster", "ray"),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
        ("slurm", "submitit"),
    ],
)
def test_a_launcher_not_installed_is_one_line_naming_the_extra(store, launcher, module):
    proc = _cli_without(
        module, ["-m", f"hydra/launcher={launcher}", "seed=1,2"], store.dir, sweep_env(store.uri)
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hydra/launcher={launcher}: ")
    assert "pip install 'sparsify_exp[cluster]'" in lines[0]
    assert store.runs() == []


def test_an_unreachable_ray_cluster_is_one_line_before_any_run(store):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_sweep(
        ["hydra/launcher=ray", f"hydra.launcher.address={address}", *JOB, levels(2)],
        store.dir,
        sweep_env(store.uri),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ray cluster {address} unreachable: connection refused"
    ]
    assert store.runs() == []
    assert not list(store.dir.glob("multirun/*/*/0"))


def test_an_unreachable_ray_address_from_the_environment_is_named(store):
    address = f"127.0.0.1:{free_port()}"
    proc = run_sweep(
        ["hydra/launcher=ray", *JOB, levels(2)],
        store.dir,
        sweep_env(store.uri, RAY_ADDRESS=address),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ray cluster {address} unreachable: connection refused"
    ]


def test_an_unreachable_tracking_server_is_one_line_before_any_job(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_sweep(["hydra/launcher=slurm_local", *JOB, levels(2)], tmp_path, sweep_env(uri), 60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracking server {uri} unreachable"), lines
    assert not list(tmp_path.glob("multirun/*/*/.submitit"))  # no job was submitted


@pytest.mark.slow
def test_sigterm_to_a_ray_sweep_kills_the_parent_and_cancels_the_jobs(store, tmp_path):
    """Ray's driver exits on SIGTERM by default; the sweep's own handling wins: exit 143,
    the parent KILLED, no job left RUNNING."""
    import signal
    import time

    with ray_head(tmp_path / "ray.log") as head:
        args = [
            "hydra/launcher=ray",
            f"hydra.launcher.address={head.address}",
            "data.tensors=[{name: w, shape: [2048, 2048]}]",
            "schedule=constant",
            "schedule.steps=3000",  # long enough that SIGTERM lands mid-run
            "eval=[]",
            "mlflow.mask_images=0",
            "output.progress=none",
            "seed=1,2,3",
        ]
        with open(store.dir / "sweep.out", "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparsify_exp", "-m", *args],
                cwd=store.dir,
                env=sweep_env(store.uri),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                children = [r for r in store.runs() if "mlflow.parentRunId" in r.data.tags]
                if any(r.info.status == "RUNNING" for r in children):
                    break
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (store.dir / "sweep.out").read_text()
    assert proc.returncode == 143, output[-3000:]
    (parent,) = find_sweeps(store.client, "sparsify_exp")
    parent, children = find_sweep_runs(store.client, parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["sparsify.failure"] == "SIGTERM: stopped by SIGTERM"
    assert children and "RUNNING" not in {c.info.status for c in children}
    assert "KILLED" in {c.info.status for c in children}


@pytest.mark.slow
def test_a_ray_job_whose_worker_dies_fails_alone(store, tmp_path):
    """A job that kills its Ray worker (``os._exit``, as the OOM killer would) is reported
    failed; the other job finishes and the sweep's parent ends FAILED, naming the count. The
    evaluator lives in the launch folder: Ray's workers import it from there too."""
    (store.dir / "dying.py").write_text(
        "import os\n"
        "from sparsify_exp.runner.evaluation.base import Evaluator\n\n\n"
        "class Die(Evaluator):\n"
        "    name = 'die'\n\n"
        "    def __init__(self, now: bool = False):\n"
        "        self.now = now\n\n"
        "    def on_start(self, ctx):\n"
        "        if self.now:\n"
        "            os._exit(3)\n"
        "        return {'die/alive': 1.0}\n"
    )
    with ray_head(tmp_path / "ray.log") as head:
        proc = run_sweep(
            [
                "hydra/launcher=ray",
                f"hydra.launcher.address={head.address}",
                *JOB,
                "+eval.die._target_=dying.Die",
                "+eval.die.now=false,true",
            ],
            store.dir,
            sweep_env(store.uri),
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    (parent,) = find_sweeps(store.client, "sparsify_exp")
    parent, children = find_sweep_runs(store.client, parent.info.run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["sparsify.jobs_failed"] == "1"
    (done,) = [c for c in children if c.info.status == "FINISHED"]
    assert done.data.metrics["die/alive"] == 1.0
    assert "Ray task failed" in out
