"""Config schemas and up-front validation for the runner.

The YAML in ``conf/`` is plain Hydra config; the schemas here (dataclasses) say what each node
may hold. They are checked by :func:`validate` rather than bound as Hydra structured configs on
purpose: a bound schema stops composition at the *first* bad value with Hydra's multi-line
message, while :func:`validate` reports *every* problem at once, one line each, in the form
``key=value: what is allowed`` -- before any data is built or any MLflow run is created.

What is checked:

* required values (``???``) and interpolations that do not resolve;
* types and ranges of every known field (``sparsifier.sparsity_level=1.5: must be in [0, 1]``),
  and unknown keys of the runner's own nodes (``mlflow``, ``output``, ``schedule``);
* every ``_target_``: it imports, and its keys are arguments of the callable (torchtune-style);
* the library's own checks, by building the sparsifier, scheduler and evaluators without data;
* cross-field rules: ``zeros_per_block`` fits the block, a schedule has enough steps, per-name
  rules name real sparsifier arguments, a file exists and has a known suffix.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError", "format_value", "register_resolvers", "validate"]


class ConfigError(Exception):
    """A configuration mistake: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.report())

    def report(self) -> str:
        n = len(self.problems)
        head = f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


# --------------------------------------------------------------------------- resolvers


def _last_step(steps: Any, start_step: Any = 0, step_interval: Any = 1) -> int:
    """Epochs a ramp needs to reach its target at the run's last step (step ``steps - 1``)."""
    try:
        n = int(steps) - 1 - int(start_step)
        return max(n // max(int(step_interval), 1), 0)
    except (TypeError, ValueError):
        return 0


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sparsify.last_step"):
        OmegaConf.register_new_resolver("sparsify.last_step", _last_step)


register_resolvers()

# --------------------------------------------------------------------------- schemas


def rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class MlflowSchema:
    tracking_uri: str | None = None
    experiment: str = field(default="sparsify_exp", metadata={"nonempty": True})
    run_name: str | None = None
    log_every: int = field(default=1, metadata=rng(1))
    max_name_metrics: int = field(default=20, metadata=rng(0))
    masks_every: int = field(default=0, metadata=rng(0))
    mask_images: int = field(default=16, metadata=rng(0))
    image_max_side: int = field(default=512, metadata=rng(8))
    log_data: bool = True
    tags: dict = field(default_factory=dict)


@dataclass
class OutputSchema:
    write_data: bool = True
    progress: str = field(default="auto", metadata={"choices": ("auto", "bar", "log", "none")})


@dataclass
class ScheduleSchema:
    steps: int = field(default=1, metadata=rng(1))
    scheduler: dict | None = None


@dataclass
class DataNormSchema:
    sparsity_level: float = field(default=0.5, metadata=rng(0, 1))
    sparse_block_shape: list[int] = field(
        default_factory=lambda: [1, 4], metadata={"length": 2, "item_min": 1}
    )
    zeros_per_block: int | None = field(default=None, metadata=rng(1))
    norm: str = field(default="L1", metadata={"choices": ("L1", "L2")})


@dataclass
class LinearSchema:
    schedule_param: str = "sparsity_level"
    initial_value: float = field(default=0.0, metadata=rng(0, 1))
    target: float | dict | None = field(default=None, metadata=rng(0, 1))
    start_step: int = field(default=0, metadata=rng(0))
    total_steps: int = field(default=10, metadata=rng(0))


@dataclass
class CubicSchema(LinearSchema):
    total_steps: int = field(default=10, metadata=rng(1))
    step_interval: int = field(default=1, metadata=rng(1))


@dataclass
class StepSchema:
    schedule_param: str = "sparsity_level"
    step_size: int = field(default=1, metadata=rng(1))
    gamma: float = field(default=1.0, metadata=rng(0, lo_open=True))
    initial_value: float | None = field(default=None, metadata=rng(0, 1))
    target: float | dict | None = field(default=None, metadata=rng(0, 1))


@dataclass
class ConstantSchema:
    schedule_param: str = "sparsity_level"
    target: float | dict | None = field(default=None, metadata=rng(0, 1))


@dataclass
class TensorSpec:
    name: str = field(default="", metadata={"nonempty": True})
    shape: list[int] = field(default_factory=list, metadata={"min_length": 1, "item_min": 1})


@dataclass
class TensorsSchema:
    tensors: list[TensorSpec] = field(default_factory=list, metadata={"min_length": 1})
    dtype: str = field(
        default="float32", metadata={"choices": ("float32", "float64", "float16", "bfloat16")}
    )
    init: str = field(default="normal", metadata={"choices": ("normal", "uniform")})
    seed: int = 0


@dataclass
class TableSpec:
    name: str = field(default="", metadata={"nonempty": True})
    kind: str = field(default="embedding", metadata={"choices": ("embedding", "embedding_bag")})
    num_embeddings: int = field(default=1, metadata=rng(1))
    embedding_dim: int = field(default=1, metadata=rng(1))
    mode: str | None = field(default=None, metadata={"choices": (None, "sum", "mean", "max")})


@dataclass
class EmbeddingsSchema:
    tables: list[TableSpec] = field(default_factory=list, metadata={"min_length": 1})
    seed: int = 0


@dataclass
class ModelSchema:
    module: dict = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class FileSchema:
    path: str = field(default="", metadata={"nonempty": True})
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class PerNameRule:
    pattern: str = field(default="*", metadata={"nonempty": True})
    skip: bool = False
    config: dict = field(default_factory=dict)


@dataclass
class PerNameSchema:
    rules: list[PerNameRule] = field(default_factory=list)


#: Schemas for the shipped ``_target_`` callables (others get signature checks only).
TARGET_SCHEMAS: dict[str, type] = {
    "sparsify_exp.DataNormSparsifier": DataNormSchema,
    "sparsify_exp.sparsifier.DataNormSparsifier": DataNormSchema,
    "sparsify_exp.sparsifier.data_norm.DataNormSparsifier": DataNormSchema,
    "sparsify_exp.LinearScheduler": LinearSchema,
    "sparsify_exp.CubicScheduler": CubicSchema,
    "sparsify_exp.StepScheduler": StepSchema,
    "sparsify_exp.ConstantScheduler": ConstantSchema,
    "sparsify_exp.runner.data.tensors.build": TensorsSchema,
    "sparsify_exp.runner.data.embeddings.build": EmbeddingsSchema,
    "sparsify_exp.runner.data.model.build": ModelSchema,
    "sparsify_exp.runner.data.file.build": FileSchema,
}

#: Hydra's instantiate keys, allowed on any ``_target_`` node.
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}

# --------------------------------------------------------------------------- formatting


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
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


# --------------------------------------------------------------------------- checker


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, key: str, value: Any, message: str) -> None:
        line = " ".join(f"{key}={format_value(value)}: {message}".split())  # one line, always
        if line not in self.problems:
            self.problems.append(line)

    # ---- types

    def type_ok(self, key: str, value: Any, tp: Any, meta: Mapping) -> bool:
        """Checks ``value`` against annotation ``tp`` (reports and returns False when wrong)."""
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return True
        if origin is Union or origin is types.UnionType:
            if value is None:
                if type(None) in args:
                    return True
                self.add(key, value, "must not be null")
                return False
            non_null = [a for a in args if a is not type(None)]
            for a in non_null:
                if self._matches(value, a):
                    return self.type_ok(key, value, a, meta)
            names = " or ".join(_type_name(a) for a in non_null)
            self.add(key, value, f"must be {names}")
            return False
        if value is None:
            self.add(key, value, f"must be {_type_name(tp)}, not null")
            return False
        if not self._matches(value, tp):
            self.add(key, value, f"must be {_type_name(tp)}")
            return False
        if origin is list and args:
            ok = True
            for i, item in enumerate(value):
                sub_key = f"{key}[{i}]"
                if dataclasses.is_dataclass(args[0]):
                    if not isinstance(item, Mapping):
                        self.add(sub_key, item, f"must be a mapping with {_fields(args[0])}")
                        ok = False
                    else:
                        self.check_schema(sub_key, item, args[0])
                elif self.type_ok(sub_key, item, args[0], {}):
                    lo = meta.get("item_min")
                    if lo is not None and item < lo:
                        self.add(key, value, f"every entry must be >= {_num(lo)}")
                        ok = False
            return ok
        return True

    @staticmethod
    def _matches(value: Any, tp: Any) -> bool:
        origin = typing.get_origin(tp) or tp
        if tp is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if tp is bool:
            return isinstance(value, bool)
        if tp is str:
            return isinstance(value, str)
        if origin is list:
            return isinstance(value, (list, tuple))
        if origin is dict:
            return isinstance(value, Mapping)
        if dataclasses.is_dataclass(tp):
            return isinstance(value, Mapping)
        return isinstance(value, origin)

    # ---- constraints

    def constraints(self, key: str, value: Any, meta: Mapping) -> None:
        if value is None:
            return
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join(format_value(c) for c in meta["choices"])
            self.add(key, value, f"must be one of: {allowed}")
        if meta.get("nonempty") and isinstance(value, str) and not value.strip():
            self.add(key, value, "must not be empty")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
            bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
                hi is not None and value > hi
            )
            if bad:
                if lo is not None and hi is not None:
                    self.add(
                        key, value, f"must be in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"
                    )
                elif lo is not None:
                    self.add(key, value, f"must be {'>' if lo_open else '>='} {_num(lo)}")
                else:
                    self.add(key, value, f"must be <= {_num(hi)}")
        if isinstance(value, Mapping) and ("lo" in meta):
            # a per-name dict of numbers (scheduler targets)
            for k, v in value.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    self.add(f"{key}.{k}", v, "must be a number")
                else:
                    self.constraints(f"{key}.{k}", v, meta)
        if isinstance(value, (list, tuple)):
            if "length" in meta and len(value) != meta["length"]:
                self.add(key, value, f"must have {meta['length']} entries")
            if "min_length" in meta and len(value) < meta["min_length"]:
                self.add(key, value, f"must have at least {meta['min_length']} entry")

    def check_schema(
        self, prefix: str, node: Mapping, schema: type, *, allow_extra: bool = False
    ) -> None:
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for name, f in fields.items():
            if name not in node:
                continue
            value = node[name]
            key = f"{prefix}.{name}" if prefix else name
            if self.type_ok(key, value, hints[name], f.metadata):
                self.constraints(key, value, f.metadata)
        if not allow_extra:
            for name in node:
                if name not in fields and name not in HYDRA_KEYS:
                    key = f"{prefix}.{name}" if prefix else name
                    self.add(key, node[name], f"unknown key (allowed: {', '.join(fields)})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is list:
        args = typing.get_args(tp)
        return (
            f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
            if args
            else "a list"
        )
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with {_fields(tp)}"
    return getattr(tp, "__name__", str(tp))


def _fields(schema: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(schema))


# --------------------------------------------------------------------------- targets


def import_target(path: str) -> Any:
    """``pkg.mod.attr`` -> the object, as Hydra's ``instantiate`` would locate it."""
    from hydra._internal.utils import _locate

    return _locate(path)


def _check_target(
    ck: _Checker, prefix: str, node: Mapping, *, supplied: tuple[str, ...] = ()
) -> Callable | None:
    """Imports ``node._target_`` and checks ``node``'s keys against its signature."""
    target = node.get("_target_")
    key = f"{prefix}._target_"
    if not isinstance(target, str) or not target:
        ck.add(key, target, "must be a dotted path to a class or function")
        return None
    try:
        obj = import_target(target)
    except Exception as e:
        ck.add(key, target, f"cannot import ({type(e).__name__}: {e})")
        return None
    if not callable(obj):
        ck.add(key, target, "is not callable")
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not var_kw:
        for k in node:
            if k not in HYDRA_KEYS and k not in params:
                allowed = ", ".join(n for n in named if n not in supplied and n != "self")
                ck.add(
                    f"{prefix}.{k}",
                    node[k],
                    f"not an argument of {target.rsplit('.', 1)[-1]} (allowed: {allowed})",
                )
    for n, p in params.items():
        if (
            p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n not in node
            and n not in supplied
        ):
            ck.add(f"{prefix}.{n}", None, f"required by {target.rsplit('.', 1)[-1]}")
    return obj


def _schema_for(target: Any) -> type | None:
    return TARGET_SCHEMAS.get(target) if isinstance(target, str) else None


# --------------------------------------------------------------------------- resolution


def _resolve(ck: _Checker, cfg: DictConfig) -> dict | None:
    """The config as plain containers, reporting missing values and broken interpolations."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    for key in sorted(OmegaConf.missing_keys(body)):
        ck.add(key, "???", f"required: set it on the command line ({key}=...)")

    def walk(node: Any, prefix: str) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for k, _ in items:
            key = (
                f"{prefix}.{k}"
                if prefix and isinstance(node, DictConfig)
                else (f"{prefix}[{k}]" if prefix else str(k))
            )
            if OmegaConf.is_missing(node, k):
                continue
            if OmegaConf.is_interpolation(node, k):
                try:
                    node[k]
                except Exception as e:
                    raw = node._get_node(k)._value()
                    msg = str(e).splitlines()[0]
                    ck.add(key, raw, f"cannot resolve ({msg})")
                continue
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                walk(child, key)

    walk(body, "")
    if ck.problems:
        return None
    return OmegaConf.to_container(body, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- validate


def validate(cfg: DictConfig, *, build: bool = True) -> list[str]:
    """Every problem of ``cfg``, one line each (empty when the config is good).

    ``build``: also build the sparsifier, scheduler and evaluators without data, so the
    library's own argument checks run now rather than mid-run.
    """
    ck = _Checker()
    c = _resolve(ck, cfg)
    if c is None:
        return ck.problems

    for group in ("data", "sparsifier", "schedule", "per_name", "mlflow", "output"):
        if not isinstance(c.get(group), Mapping):
            ck.add(group, c.get(group), "must be a mapping (pick an option: " + group + "=...)")
    if ck.problems:
        return ck.problems
    if not isinstance(c.get("seed"), int) or isinstance(c.get("seed"), bool):
        ck.add("seed", c.get("seed"), "must be an integer")

    ck.check_schema("mlflow", c["mlflow"], MlflowSchema)
    ck.check_schema("output", c["output"], OutputSchema)
    tags = c["mlflow"].get("tags")
    if isinstance(tags, Mapping):
        for k, v in tags.items():
            if isinstance(v, (dict, list)):
                ck.add(f"mlflow.tags.{k}", v, "must be a string or number")

    # ---- data
    data = c["data"]
    n_before = len(ck.problems)
    data_fn = _check_target(ck, "data", data)
    schema = _schema_for(data.get("_target_"))
    if schema is not None:
        ck.check_schema("data", data, schema, allow_extra=True)
    if data_fn is not None and len(ck.problems) == n_before:
        _check_data(ck, data)

    # ---- sparsifier
    sp_node = c["sparsifier"]
    n_before = len(ck.problems)
    sp_cls = _check_target(ck, "sparsifier", sp_node, supplied=("data_list",))
    sp_schema = _schema_for(sp_node.get("_target_"))
    if sp_schema is not None:
        ck.check_schema("sparsifier", sp_node, sp_schema, allow_extra=True)
        _check_block_zeros(ck, "sparsifier", sp_node)
    sp_ok = sp_cls is not None and len(ck.problems) == n_before

    # ---- per-name rules
    ck.check_schema("per_name", c["per_name"], PerNameSchema)
    if sp_cls is not None and isinstance(c["per_name"].get("rules"), list):
        _check_rules(ck, c["per_name"]["rules"], sp_cls, sp_schema)

    # ---- schedule
    sched = c["schedule"]
    n_before = len(ck.problems)
    ck.check_schema("schedule", sched, ScheduleSchema)
    sched_node = sched.get("scheduler")
    sched_cls = None
    if isinstance(sched_node, Mapping):
        sched_cls = _check_target(
            ck,
            "schedule.scheduler",
            sched_node,
            supplied=("data_sparsifier", "last_epoch", "verbose"),
        )
        s_schema = _schema_for(sched_node.get("_target_"))
        if s_schema is not None:
            ck.check_schema("schedule.scheduler", sched_node, s_schema, allow_extra=True)
            _check_schedule_length(ck, sched, sched_node)
    sched_ok = sched_cls is not None and len(ck.problems) == n_before
    if any(p.startswith("schedule.steps=") for p in ck.problems):
        # total_steps is derived from schedule.steps: one line about the cause is enough
        derived = [
            k
            for k in ("total_steps",)
            if isinstance(cfg.schedule.get("scheduler"), DictConfig)
            and OmegaConf.is_interpolation(cfg.schedule.scheduler, k)
        ]
        ck.problems = [
            p
            for p in ck.problems
            if not any(p.startswith(f"schedule.scheduler.{k}=") for k in derived)
        ]

    # ---- evaluators
    ev = c.get("eval")
    ev_ok: dict[str, Mapping] = {}
    if ev is not None and not isinstance(ev, Mapping):
        ck.add("eval", ev, "must be a mapping name -> evaluator (eval=[fidelity,...])")
    elif ev:
        for name, node in ev.items():
            if not isinstance(node, Mapping):
                ck.add(f"eval.{name}", node, "must be a mapping with _target_")
                continue
            n_before = len(ck.problems)
            obj = _check_target(ck, f"eval.{name}", node)
            if obj is not None and len(ck.problems) == n_before:
                ev_ok[name] = node

    if ck.problems:
        ck.problems = _drop_derived(cfg, ck.problems)

    # ---- build the library objects without data: their own checks, now
    if build:
        sp = None
        if sp_ok:
            sp = _try_build(ck, "sparsifier", sp_node)
        if sp is not None and sched_ok and isinstance(sched_node, Mapping):
            param = sched_node.get("schedule_param", "sparsity_level")
            in_rules = any(
                isinstance(r, Mapping) and param in (r.get("config") or {})
                for r in c["per_name"].get("rules") or []
            )
            if param not in (getattr(sp, "defaults", None) or {}) and not in_rules:
                keys = ", ".join(getattr(sp, "defaults", None) or {}) or "none"
                ck.add(
                    "schedule.scheduler.schedule_param",
                    param,
                    f"{type(sp).__name__} has no such config key to schedule (its keys: "
                    f"{keys}); use schedule=once or another sparsifier",
                )
            else:
                _try_build(ck, "schedule.scheduler", sched_node, data_sparsifier=sp)
        for name, enode in ev_ok.items():
            _try_build(ck, f"eval.{name}", enode)
    return ck.problems


_SIMPLE_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _drop_derived(cfg: DictConfig, problems: list[str]) -> list[str]:
    """Drops ``data.seed=x`` when it is ``${seed}`` and ``seed=x`` is already reported."""
    keys = [p.split("=", 1)[0] for p in problems]
    out = []
    for key, problem in zip(keys, problems, strict=True):
        parent_key, _, leaf = key.rpartition(".")
        try:
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            raw = parent._get_node(leaf)._value() if isinstance(parent, DictConfig) else None
        except Exception:
            raw = None
        m = _SIMPLE_INTERPOLATION.match(raw) if isinstance(raw, str) else None
        if m and m.group(1) in keys:
            continue
        out.append(problem)
    return out


def _try_build(ck: _Checker, prefix: str, node: Mapping, **kwargs: Any) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(dict(node), _convert_="all", **kwargs)
    except Exception as e:
        err = e
        while err.__cause__ is not None and "Error in call to target" in str(err):
            err = err.__cause__  # type: ignore[assignment]
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        ck.add(prefix, node.get("_target_"), f"rejected its arguments: {msg}")
        return None


def _check_block_zeros(ck: _Checker, prefix: str, node: Mapping) -> None:
    block, zeros = node.get("sparse_block_shape"), node.get("zeros_per_block")
    if (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and b >= 1 for b in block)
        and isinstance(zeros, int)
        and not isinstance(zeros, bool)
        and zeros > block[0] * block[1]
    ):
        ck.add(
            f"{prefix}.zeros_per_block",
            zeros,
            f"must be <= {block[0] * block[1]}, the entries of a {block[0]}x{block[1]} block",
        )


def _check_schedule_length(ck: _Checker, sched: Mapping, node: Mapping) -> None:
    steps = sched.get("steps")
    if not isinstance(steps, int) or steps < 1:
        return
    target = node.get("_target_", "")
    if target.endswith("CubicScheduler"):
        start, interval = node.get("start_step", 0), node.get("step_interval", 1)
        if isinstance(start, int) and isinstance(interval, int) and interval >= 1:
            need = start + 1 + interval
            if steps < need:
                ck.add(
                    "schedule.steps",
                    steps,
                    f"a cubic schedule with start_step={start}, step_interval={interval} "
                    f"needs steps >= {need} (schedule=once runs one step)",
                )
    if target.endswith(("LinearScheduler", "CubicScheduler")):
        start = node.get("start_step", 0)
        if isinstance(start, int) and start >= steps:
            ck.add(
                "schedule.scheduler.start_step",
                start,
                f"must be < schedule.steps={steps} (the ramp would never start)",
            )


def _sparsifier_keys(sp_cls: Any, sp_schema: type | None) -> list[str]:
    keys: list[str] = []
    if sp_schema is not None:
        keys = [f.name for f in dataclasses.fields(sp_schema)]
    try:
        for n, p in inspect.signature(sp_cls).parameters.items():
            if n not in ("self", "data_list") and p.kind is not p.VAR_KEYWORD and n not in keys:
                keys.append(n)
    except (TypeError, ValueError):
        pass
    return keys


def _check_rules(ck: _Checker, rules: list, sp_cls: Any, sp_schema: type | None) -> None:
    allowed = _sparsifier_keys(sp_cls, sp_schema)
    try:
        var_kw = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(sp_cls).parameters.values())
    except (TypeError, ValueError):
        var_kw = True
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            continue
        conf = rule.get("config")
        prefix = f"per_name.rules[{i}].config"
        if not isinstance(conf, Mapping):
            continue
        if rule.get("skip") and conf:
            ck.add(f"per_name.rules[{i}]", dict(rule), "skip: true takes no config")
        for k, v in conf.items():
            if k not in allowed and not (var_kw and sp_schema is None):
                ck.add(
                    f"{prefix}.{k}",
                    v,
                    f"not a config key of {sp_cls.__name__} "
                    f"(allowed: {', '.join(allowed) or 'none'})",
                )
        if sp_schema is not None:
            ck.check_schema(prefix, conf, sp_schema, allow_extra=True)
            _check_block_zeros(ck, prefix, conf)
        pattern = rule.get("pattern")
        if isinstance(pattern, str):
            try:
                import fnmatch

                re.compile(fnmatch.translate(pattern))
            except re.error as e:
                ck.add(f"per_name.rules[{i}].pattern", pattern, f"bad pattern ({e})")


def _check_data(ck: _Checker, data: Mapping) -> None:
    target = data.get("_target_")
    if target == "sparsify_exp.runner.data.file.build":
        from sparsify_exp.runner.data import select_names
        from sparsify_exp.runner.data.file import SUFFIXES, list_names

        path = Path(os.path.expanduser(str(data["path"])))
        if path.suffix not in SUFFIXES:
            ck.add("data.path", data["path"], f"must end in one of: {', '.join(SUFFIXES)}")
        elif not path.is_file():
            where = path if path.is_absolute() else Path.cwd() / path
            ck.add("data.path", data["path"], f"no such file ({where})")
        elif path.suffix == ".safetensors":
            # the header is cheap to read: check the patterns select something now
            try:
                names = list_names(path)
            except Exception as e:
                ck.add("data.path", data["path"], f"not a readable safetensors file ({e})")
                return
            if not select_names(names, data.get("include"), data.get("exclude")):
                ck.add(
                    "data.include",
                    data.get("include"),
                    f"with data.exclude={format_value(data.get('exclude'))} selects no floating "
                    f"tensor (available: {', '.join(names[:10])}"
                    f"{', ...' if len(names) > 10 else ''})",
                )
    elif target == "sparsify_exp.runner.data.tensors.build":
        _check_unique_names(ck, "data.tensors", data.get("tensors") or [])
    elif target == "sparsify_exp.runner.data.embeddings.build":
        specs = data.get("tables") or []
        _check_unique_names(ck, "data.tables", specs)
        for i, s in enumerate(specs):
            if isinstance(s, Mapping) and s.get("kind") == "embedding" and s.get("mode"):
                ck.add(f"data.tables[{i}].mode", s["mode"], "only an embedding_bag has a mode")
    elif target == "sparsify_exp.runner.data.model.build":
        module = data.get("module")
        if not isinstance(module, Mapping):
            ck.add("data.module", module, "must be a mapping with _target_ (an nn.Module)")
        else:
            _check_target(ck, "data.module", module)


def _check_unique_names(ck: _Checker, key: str, specs: list) -> None:
    names = [spec.get("name") for spec in specs if isinstance(spec, Mapping)]
    duplicates = sorted({str(n) for n in names if names.count(n) > 1})
    if duplicates:
        ck.add(key, duplicates, "names must be unique")
