"""Up-front validation of a composed config: every problem at once, one line each
(``key=value: what is allowed``), before any output folder, MLflow run or data exists.

* The runner's own nodes (``seed``, ``mlflow``, ``output``, ``schedule``, ``per_name``,
  ``objective``) are the pydantic models below.
* A ``_target_`` node (``data``, ``sparsifier``, ``schedule.scheduler``, ``eval.<name>``) is
  bound to its callable's signature and validated against the signature's annotations: a data
  source declares its types, ranges and cross-field rules next to its builder.
* Then the library checks its own rules: the sparsifier, scheduler and evaluators are built
  without data, and a :class:`~sparsify_exp.errors.ConfigValueError` names the bad key.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    create_model,
)

from sparsify_exp.errors import ConfigValueError
from sparsify_exp.runner.calibration.checks import calibration_problems
from sparsify_exp.runner.config import (
    EVAL_EVERY,
    HYDRA_KEYS,
    RunnerConfig,
    evaluator_nodes,
    format_value,
)

__all__ = ["validate"]


# --------------------------------------------------------------------------- problems


class _Problems:
    """Collects ``key=value: message`` lines, the first per key."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}

    def add(self, key: str, value: Any, message: str) -> None:
        if key not in self.lines:
            self.lines[key] = " ".join(f"{key}={format_value(value)}: {message}".split())

    def add_validation_error(
        self, prefix: str, error: ValidationError, data: Any, model: type[BaseModel]
    ) -> None:
        for e in error.errors():
            key, value, consumed = _locate(e["loc"], data)
            if e["type"] == "missing" and consumed:
                self.add(_join(prefix, key), None, "required")
            elif e["type"] == "extra_forbidden":
                allowed = ", ".join(_fields_at(model, e["loc"][:-1]))
                self.add(_join(prefix, key), value, f"unknown key (allowed: {allowed})")
            else:
                self.add(_join(prefix, key), value, _message(e, consumed))


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """The field names of the model found at ``loc`` (list items and optionals looked into)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return []
        model = field.annotation
        while typing.get_origin(model) is not None:  # list[X], X | None
            args = [a for a in typing.get_args(model) if a is not type(None)]
            model = args[0] if args else None
    return (
        list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    )


def _join(prefix: str, key: str) -> str:
    if not key:
        return prefix
    return key if not prefix else f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _locate(loc: tuple, data: Any) -> tuple[str, Any, bool]:
    """The user's key for a pydantic error location, the value there, and whether the whole
    location was walked (a union branch's name or a missing tuple item stops the walk)."""
    key, value = "", data
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(value, (list, tuple)) and part < len(value):
            key, value = f"{key}[{part}]", value[part]
        elif isinstance(part, str) and isinstance(value, Mapping) and part in value:
            key, value = _join("", f"{key}.{part}" if key else part), value[part]
        elif isinstance(part, str) and isinstance(value, Mapping) and i == len(loc) - 1:
            return (f"{key}.{part}" if key else part), None, True
        else:
            return key, value, False
    return key, value, True


def _message(error: Mapping[str, Any], consumed: bool) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "has too few entries"
    if kind == "too_long" and ctx.get("field_type") == "Tuple":
        return f"must have {ctx['max_length']} entries"
    if kind == "literal_error":
        return "must be one of: " + ctx["expected"].replace("'", "").replace(" or ", ", ")
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    messages = {
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "string_too_short": "must not be empty",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "list_type": "must be a list",
        "tuple_type": "must be a list",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "less_than": f"must be < {ctx.get('lt')}",
        "too_short": f"must have at least {ctx.get('min_length')} entries",
        "too_long": f"must have at most {ctx.get('max_length')} entries",
    }
    return messages.get(kind, str(error["msg"]))


# --------------------------------------------------------------------------- targets


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _signature_model(fn: Callable[..., Any], skip: Iterable[str]) -> type[BaseModel]:
    """A pydantic model of ``fn``'s keyword arguments, typed by its annotations."""
    try:
        hints = typing.get_type_hints(
            fn.__init__ if isinstance(fn, type) else fn, include_extras=True
        )
    except Exception:
        hints = {}
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is p.empty else p.default
        fields[name] = (hints.get(name, Any), default)
    config = ConfigDict(arbitrary_types_allowed=True, extra="allow")
    return create_model(f"{getattr(fn, '__name__', 'target')}_args", __config__=config, **fields)


def check_target(
    problems: _Problems, prefix: str, node: Mapping[str, Any], supplied: Iterable[str] = ()
) -> Callable[..., Any] | None:
    """Imports ``node._target_`` and checks ``node``'s keys against its signature; returns
    the callable when it imports."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        problems.add(f"{prefix}._target_", target, "must name a class or function to build")
        return None
    try:
        fn = _import(target)
    except Exception as e:
        problems.add(f"{prefix}._target_", target, f"cannot import ({type(e).__name__}: {e})")
        return None
    args = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    label = target.rsplit(".", 1)[-1]
    declared = tuple(getattr(fn, "config_keys", None) or ())  # what a **defaults class reads
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if hasattr(fn, "config_keys") or len(named) == len(params):
        allowed = [n for n in named if n not in supplied] + list(declared)
        for key in args.keys() - set(named) - set(declared):
            problems.add(
                f"{prefix}.{key}",
                args[key],
                f"not an argument of {label} (allowed: {', '.join(allowed) or 'none'})",
            )
    try:
        model = _signature_model(fn, supplied)
        model.model_validate(args)
    except ValidationError as e:
        problems.add_validation_error(prefix, e, args, model)
    for key, value in args.items():  # nested nodes built by the target itself
        if isinstance(value, Mapping) and "_target_" in value:
            check_target(problems, f"{prefix}.{key}", value)
    return fn


def _build(problems: _Problems, prefix: str, fn: Callable[..., Any], node: Mapping, **kw: Any):
    """Builds ``fn`` from ``node`` so the library's own checks run now; None if it refused.

    Values already reported are left out (their defaults are used), so each build attempt
    can name one more bad key: every problem is reported, not only the first one raised.
    """
    args = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    for _ in range(len(args) + 1):
        reported = [
            k for k in args if any(_under(line, _join(prefix, k)) for line in problems.lines)
        ]
        try:
            return fn(**{k: v for k, v in args.items() if k not in reported}, **kw)
        except ConfigValueError as e:
            key = _join(prefix, e.key)
            if key in problems.lines:
                return None
            problems.add(key, e.value, e.reason)
        except Exception as e:
            if not any(_under(line, prefix) for line in problems.lines):
                message = " ".join(str(e).split()) or type(e).__name__
                problems.add(prefix, node.get("_target_"), f"rejected its arguments: {message}")
            return None
    return None


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((f"{prefix}.", f"{prefix}["))


# --------------------------------------------------------------------------- validate


def validate(cfg: DictConfig) -> list[str]:
    """Every problem of ``cfg``, one line each (empty when the config is good)."""
    problems = _Problems()
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    for key in sorted(OmegaConf.missing_keys(body)):
        problems.add(key, "???", f"required: set it on the command line ({key}=...)")
    _check_interpolations(problems, body, "")
    if problems.lines:
        return list(problems.lines.values())
    c: dict[str, Any] = OmegaConf.to_container(body, resolve=True)  # type: ignore[assignment]

    try:
        RunnerConfig.model_validate(c)
    except ValidationError as e:
        problems.add_validation_error("", e, c, RunnerConfig)
    if any(
        k in problems.lines
        for k in ("data", "sparsifier", "eval", "schedule.scheduler", "calibration")
    ):
        return _drop_derived(problems, body)

    if c.get("resume"):
        _check_resume(problems, cfg, c)
    if check_target(problems, "data", c["data"]) and not problems.lines:
        _check_some_name_left(problems, c)
        _check_quantize(problems, c)
    sp_fn = check_target(problems, "sparsifier", c["sparsifier"], supplied=("data_list",))
    sched_node = c["schedule"].get("scheduler")
    sched_fn = None
    if isinstance(sched_node, Mapping):
        supplied = ("data_sparsifier", "last_epoch", "verbose")
        sched_fn = check_target(problems, "schedule.scheduler", sched_node, supplied)
        _check_schedule_length(problems, c["schedule"], sched_node)
    evaluators = {}
    for name, node in evaluator_nodes(c.get("eval")).items():
        if not isinstance(node, Mapping):
            problems.add(f"eval.{name}", node, "must be an evaluator (a mapping with _target_)")
        elif (fn := check_target(problems, f"eval.{name}", node)) is not None:
            evaluators[name] = fn
    every = (c.get("eval") or {}).get(EVAL_EVERY)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        problems.add("eval.every", every, "must be an integer >= 1 (null: only at the end)")
    train_fn = c["train"].get("fn") if isinstance(c.get("train"), Mapping) else None
    if isinstance(train_fn, Mapping):
        check_target(problems, "train.fn", train_fn, supplied=("ctx",))

    calibration = c.get("calibration")
    cal_fn = check_target(problems, "calibration", calibration) if calibration else None
    sp = _build(problems, "sparsifier", sp_fn, c["sparsifier"]) if sp_fn else None
    if sp is not None:
        for key, value, message in calibration_problems(c, sp, cal_fn):
            problems.add(key, value, message)
        _check_rules(problems, sp, c["per_name"]["rules"])
        if sched_fn is not None and _check_schedule_param(problems, sp, c):
            _build(problems, "schedule.scheduler", sched_fn, sched_node, data_sparsifier=sp)
    for name, fn in evaluators.items():
        _build(problems, f"eval.{name}", fn, c["eval"][name])
    return _drop_derived(problems, body)


def _check_interpolations(problems: _Problems, node: Any, prefix: str) -> None:
    """Reports interpolations that do not resolve (public OmegaConf API only)."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    raw = OmegaConf.to_container(node, resolve=False)
    for k in keys:
        key = f"{prefix}[{k}]" if isinstance(node, ListConfig) else _join(prefix, str(k))
        if OmegaConf.is_missing(node, k):
            continue
        try:
            child = node[k]
        except Exception as e:
            problems.add(key, raw[k], f"cannot resolve ({str(e).splitlines()[0]})")  # type: ignore[index]
            continue
        if isinstance(child, (DictConfig, ListConfig)):
            _check_interpolations(problems, child, key)


def _drop_derived(problems: _Problems, body: DictConfig) -> list[str]:
    """Drops problems of interpolated values (``data.seed: ${seed}``) when another problem
    is reported: the value it copies is what to fix."""
    derived = [k for k in problems.lines if _is_interpolation(body, k)]
    if len(derived) < len(problems.lines):
        for key in derived:
            del problems.lines[key]
    return list(problems.lines.values())


def _is_interpolation(body: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.replace("[", ".").replace("]", "").rpartition(".")
    parent = OmegaConf.select(body, parent_key) if parent_key else body
    if not isinstance(parent, (DictConfig, ListConfig)):
        return False
    index: Any = int(leaf) if isinstance(parent, ListConfig) and leaf.isdigit() else leaf
    try:
        return OmegaConf.is_interpolation(parent, index)
    except Exception:
        return False


def _check_rules(problems: _Problems, sp: Any, rules: list[Mapping[str, Any]]) -> None:
    """Each per-name rule's config: keys the sparsifier has, values its own check accepts."""
    allowed = list(getattr(sp, "defaults", {}) or {})
    label = type(sp).__name__
    for i, rule in enumerate(rules):
        prefix, conf = f"per_name.rules[{i}]", rule.get("config") or {}
        if rule.get("skip") and conf:
            problems.add(prefix, dict(rule), "skip: true takes no config")
        unknown = [k for k in conf if k not in allowed]
        for key in unknown:
            problems.add(
                f"{prefix}.config.{key}",
                conf[key],
                f"not a config key of {label} (allowed: {', '.join(allowed) or 'none'})",
            )
        if getattr(sp, "scope", "local") == "global" and "sparsity_level" in conf:
            problems.add(
                f"{prefix}.config.sparsity_level",
                conf["sparsity_level"],
                "sparsifier.scope=global uses one level for every name: set "
                "sparsifier.sparsity_level, or skip the name",
            )
        if not unknown:
            _check_name_config(problems, sp, f"{prefix}.config", conf)


def _check_name_config(problems: _Problems, sp: Any, prefix: str, conf: Mapping) -> None:
    try:
        sp.validate_config("<config>", {**sp.defaults, **conf})
    except ConfigValueError as e:
        problems.add(f"{prefix}.{e.key}", e.value, e.reason)
    except ValueError as e:
        problems.add(prefix, dict(conf), " ".join(str(e).split()))


def _check_schedule_param(problems: _Problems, sp: Any, c: Mapping[str, Any]) -> bool:
    """The scheduled key exists on the sparsifier, and its scheduled values are valid there."""
    node = c["schedule"]["scheduler"]
    param = node.get("schedule_param", "sparsity_level")
    defaults = getattr(sp, "defaults", {}) or {}
    in_rules = any(param in (r.get("config") or {}) for r in c["per_name"]["rules"])
    if param not in defaults and not in_rules:
        problems.add(
            "schedule.scheduler.schedule_param",
            param,
            f"{type(sp).__name__} has no such config key to schedule (its keys: "
            f"{', '.join(defaults) or 'none'}); use schedule=once or another sparsifier",
        )
        return False
    for key in ("target", "initial_value"):
        values = node.get(key)
        items = values.items() if isinstance(values, Mapping) else [(None, values)]
        for name, value in items:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # the scheduler's own check reports it
            where = f"schedule.scheduler.{key}" + (f".{name}" if name is not None else "")
            try:  # a scheduled value must be one the sparsifier accepts for that key
                sp.validate_config("<schedule>", {**defaults, param: value})
            except ConfigValueError as e:
                problems.add(where, value, e.reason)
            except ValueError as e:
                problems.add(where, value, " ".join(str(e).split()))
    return True


def _check_schedule_length(problems: _Problems, sched: Mapping, node: Mapping) -> None:
    """A ramp must fit in ``schedule.steps`` (its ``total_steps`` is derived from them)."""
    steps, target = sched.get("steps"), str(node.get("_target_", ""))
    if not isinstance(steps, int) or steps < 1:
        return
    start, interval = node.get("start_step", 0), node.get("step_interval", 1)
    if not isinstance(start, int) or not isinstance(interval, int) or interval < 1:
        return
    if target.endswith("CubicScheduler") and steps < start + 1 + interval:
        problems.add(
            "schedule.steps",
            steps,
            f"a cubic schedule with start_step={start}, step_interval={interval} needs "
            f"steps >= {start + 1 + interval} (schedule=once runs one step)",
        )
    if target.endswith(("LinearScheduler", "CubicScheduler")) and start >= steps:
        problems.add(
            "schedule.scheduler.start_step",
            start,
            f"must be < schedule.steps={steps} (the ramp would never start)",
        )


def _check_resume(problems: _Problems, cfg: DictConfig, c: Mapping[str, Any]) -> None:
    """``resume=``: a stopped run with a checkpoint, and overrides that agree with its config."""
    from sparsify_exp.runner.tracking.store import resolve_tracking_uri
    from sparsify_exp.runner.train import resume

    hydra = cfg.get("hydra") if "hydra" in cfg else None
    overrides = list(OmegaConf.select(hydra, "overrides.task", default=[]) or []) if hydra else []
    launch = OmegaConf.select(hydra, "runtime.cwd", default=None) if hydra else None
    uri = resolve_tracking_uri(c["mlflow"]["tracking_uri"], launch or Path.cwd())
    for line in resume.problems(str(c["resume"]), uri, overrides, c):
        problems.lines[f"resume:{len(problems.lines)}"] = line


def _check_some_name_left(problems: _Problems, c: Mapping[str, Any]) -> None:
    """Per-name rules that skip every name leave nothing to sparsify. The names are known up
    front when the data source's module has ``names(**config)`` next to its builder."""
    rules = c["per_name"]["rules"]
    if not any(r.get("skip") for r in rules):
        return
    module = importlib.import_module(str(c["data"]["_target_"]).rpartition(".")[0])
    names_of = getattr(module, "names", None)
    if names_of is None:
        return
    args = {k: v for k, v in c["data"].items() if k not in HYDRA_KEYS}
    names = names_of(**args)
    kept = [
        n
        for n in names
        if not any(r.get("skip") and fnmatch.fnmatchcase(n, r["pattern"]) for r in rules)
    ]
    if names and not kept:
        problems.add(
            "per_name.rules",
            [r.get("pattern") for r in rules if r.get("skip")],
            f"skip every name of the data ({len(names)}): nothing left to sparsify",
        )


def _check_quantize(problems: _Problems, c: Mapping[str, Any]) -> None:
    """``output.quantize`` needs embedding tables; a source module says whether it makes any
    (``EMBEDDING_TABLES``: True, False, or absent when only the built data can tell)."""
    if not c["output"].get("quantize"):
        return
    module = importlib.import_module(str(c["data"]["_target_"]).rpartition(".")[0])
    if getattr(module, "EMBEDDING_TABLES", None) is False:
        problems.add(
            "output.quantize",
            True,
            f"the data ({module.__name__.rsplit('.', 1)[-1]}) has no embedding tables: use "
            "data=embeddings, or data=model with nn.Embedding / nn.EmbeddingBag modules",
        )
