"""The runner's config schema: the pydantic models of its own nodes (``seed``, ``mlflow``,
``output``, ``schedule``, ``per_name``, ``objective``, ``sweep``, ``train``, ``checkpoint``) and
the small helpers every module that reads a config shares. :mod:`.validate` checks a composed
config against them."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

__all__ = ["ConfigError", "RunnerConfig", "format_value"]

HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


class ConfigError(Exception):
    """A configuration mistake: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.report())

    def report(self) -> str:
        n = len(self.problems)
        head = f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def last_step(steps: Any, start_step: Any = 0, step_interval: Any = 1) -> int:
    """Epochs a ramp needs to reach its target at the run's last step (step ``steps - 1``)."""
    try:
        return max((int(steps) - 1 - int(start_step)) // max(int(step_interval), 1), 0)
    except (TypeError, ValueError):
        return 0


if not OmegaConf.has_resolver("sparsify.last_step"):
    OmegaConf.register_new_resolver("sparsify.last_step", last_step)


def format_value(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, (dict, DictConfig)):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


EVAL_EVERY = "every"


def evaluator_nodes(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """``eval``'s evaluators: every entry but ``every`` (the evaluation period)."""
    return {k: v for k, v in (node or {}).items() if k != EVAL_EVERY}


#: Mappings that an override replaces whole (Hydra merges ``key={...}`` into a mapping, so
#: ``sweep.pick.max={}`` would keep the default bound): ``key=V`` becomes ``~key +key=V``.
REPLACED_MAPPINGS = ("sweep.pick.min", "sweep.pick.max", "objective.max")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """``eval.every=N`` as ``+eval.every=N``: ``eval`` holds only the chosen evaluators
    (``list(cfg.eval)`` names them), so the period is added when asked for. A
    :data:`REPLACED_MAPPINGS` key given a value replaces the mapping (``~key +key=V``;
    idempotent, so a run's recorded overrides paste back as they are)."""
    out: list[str] = []
    deleted = {o.split("=", 1)[0] for o in overrides if o.startswith("~")}  # ~key, ~key=null
    for o in overrides:
        key, sep, value = o.partition("=")
        bare = key.lstrip("+")
        if o.startswith(f"eval.{EVAL_EVERY}="):
            out.append(f"+{o}")
        elif sep and bare in REPLACED_MAPPINGS and not key.startswith("++"):
            if f"~{bare}" not in deleted:
                out.append(f"~{bare}")
                deleted.add(f"~{bare}")
            out.append(f"+{bare}={value}")
        else:
            out.append(o)
    return out


# --------------------------------------------------------------------------- runner nodes


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid")


NonEmpty = Annotated[str, Field(min_length=1)]


class MlflowConfig(_Node):
    tracking_uri: Annotated[str | None, AfterValidator(_tracking_uri)] = None
    experiment: NonEmpty = "sparsify_exp"
    run_name: str | None = None
    log_every: Annotated[int, Field(ge=1)] = 1
    max_name_metrics: Annotated[int, Field(ge=0)] = 20
    masks_every: Annotated[int, Field(ge=0)] = 0
    mask_images: Annotated[int, Field(ge=0)] = 16
    image_max_side: Annotated[int, Field(ge=8)] = 512
    log_data: bool = True
    tags: dict[str, str | int | float | bool] = {}
    flush_timeout_s: Annotated[float, Field(ge=0)] = 60
    heartbeat_s: Annotated[float, Field(gt=0)] = 30
    heartbeat_stale_s: Annotated[float, Field(gt=0)] | None = None
    request_timeout_s: Annotated[float, Field(ge=1)] = 10


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _tracking_uri(uri: str | None) -> str | None:
    """A URI MLflow can open: a known scheme, and for sqlite a folder that exists."""
    if uri is None:
        return None
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ValueError(
            "must be a tracking URI (sqlite:///path/mlflow.db, http://host:5000, "
            "postgresql://user@host/db, file:///path)"
        )
    if scheme == "sqlite":
        folder = Path(rest.removeprefix("///")).expanduser().absolute().parent
        if rest.startswith("///") and not folder.is_dir():
            raise ValueError(f"no such folder for the sqlite file ({folder})")
    return uri


class OutputConfig(_Node):
    write_data: Literal["auto"] | bool = "auto"
    format: Literal["dense", "bitmask", "rows"] = "dense"
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    quantize: bool = False


class ScheduleConfig(_Node):
    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    scheduler: dict[str, Any] | None = None


class PerNameRule(_Node):
    pattern: NonEmpty = "*"
    skip: bool = False
    config: dict[str, Any] = {}

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        re.compile(fnmatch.translate(pattern))
        return pattern


class PerNameConfig(_Node):
    rules: list[PerNameRule] = []


class ObjectiveConfig(_Node):
    metric: NonEmpty = "sparsity/overall"
    max: dict[str, float] = {}
    infeasible: float = -1.0


class SweepPickConfig(_Node):
    metric: NonEmpty = "_summary/sparsity"
    mode: Literal["max", "min"] = "max"
    max: dict[str, float] = {}
    min: dict[str, float] = {}


class SweepConfig(_Node):
    pick: SweepPickConfig = SweepPickConfig()


class TrainConfig(_Node):
    fn: dict[str, Any] | None = None
    steps_per_step: Annotated[int, Field(ge=0)] = 0


class CheckpointConfig(_Node):
    every: Annotated[int, Field(ge=0)] = 0


class RunnerConfig(_Node):
    """The top level: the runner's own nodes, and the ``_target_`` nodes checked apart."""

    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] = 0
    resume: str | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    mlflow: MlflowConfig
    output: OutputConfig
    schedule: ScheduleConfig
    per_name: PerNameConfig
    objective: ObjectiveConfig = ObjectiveConfig()
    sweep: SweepConfig = SweepConfig()
    data: dict[str, Any]
    sparsifier: dict[str, Any]
    train: TrainConfig = TrainConfig()
    eval: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
