"""The launcher's settings, registered as ``hydra/launcher=ray`` (a typed schema: Hydra
rejects ``hydra.launcher.num_cpus=two`` when it composes the config). No
``from __future__ import annotations`` here: Hydra's plugin scan runs this module before it
is in ``sys.modules``, where ``dataclass`` would look up string annotations."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.sparsify_ray_launcher.ray_launcher.RayLauncher"
    # The cluster: "host:port" of its head (what `ray start --head` printed), "auto" (the
    # cluster this machine belongs to), or null: $RAY_ADDRESS, else a Ray of this machine's
    # own started for the sweep (and stopped with it).
    address: str | None = None
    # Resources each job reserves; Ray runs as many jobs at once as the cluster has room for.
    num_cpus: float = 1
    num_gpus: float = 0
    memory: int | None = None  # bytes (null: no reservation)
    # Re-run a job whose worker process died (a lost node); 0: the job is reported failed.
    max_retries: int = 0
    # Ray's runtime environment for every job: env_vars, working_dir, pip, ...
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Environment variables of the submitting command that each job gets (fnmatch patterns):
    # the tracking server, and the sweep's parent run.
    forward_env: list[str] = field(default_factory=lambda: ["MLFLOW_*", "SPARSIFY_EXP_*"])
    # More ray.init() arguments, e.g. {num_cpus: 2} for a Ray started for the sweep.
    init: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/launcher", name="ray", node=RayLauncherConf, provider="sparsify_exp"
)
