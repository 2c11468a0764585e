"""``task``: the user's own quality measure, before and after sparsifying.

A callable, given by its dotted path (``fn: mypkg.evals.accuracy``) or built by Hydra
(``fn: {_target_: mypkg.evals.Scorer, _partial_: true}``), receives the model (when the data
source built one) or the mapping ``name -> data`` and returns a dict of numbers. It runs on
the dense data (``on_start``) and on the squashed data (``on_end``); each metric ``m`` is
logged as ``task/m/dense``, ``task/m/sparse`` and ``task/m/delta`` (sparse - dense).

A callable with a ``dense`` parameter compares the two itself: it is called once, after the
squash, as ``fn(model, dense=<the model before the first step>)`` (or with the named data),
and its metrics are logged as ``task/m/sparse`` only: no forward pass is spent on the dense
model against itself.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sparsify_exp.runner.evaluation._util import metric_key
from sparsify_exp.runner.evaluation.base import EvalContext, Evaluator, Metrics

_RECEIVES = ("auto", "model", "data")


def resolve_callable(fn: str | Callable[..., Any]) -> Callable[..., Any]:
    """A callable from itself or from a dotted path ``pkg.module.attr`` (nested attrs ok)."""
    if callable(fn):
        return fn
    if not isinstance(fn, str) or "." not in fn:
        raise ValueError(f"fn={fn!r}: must be a callable or a dotted path like 'pkg.module.func'")
    parts = fn.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and err.name != module_name and not module_name.startswith(err.name + "."):
                raise  # the module exists, but something it imports is missing
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ValueError(f"fn={fn!r}: {err}") from err
        if not callable(obj):
            raise ValueError(f"fn={fn!r}: a {type(obj).__name__}, not a callable")
        return obj
    raise ValueError(f"fn={fn!r}: no importable module in this path")


def _takes_dense(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a parameter named ``dense``."""
    try:
        return "dense" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class TaskEvaluator(Evaluator):
    """Runs a user callable on the dense and on the sparsified data; logs both and the delta."""

    name = "task"

    def __init__(
        self,
        fn: str | Callable[..., Any],
        receives: str = "auto",
        kwargs: Mapping[str, Any] | None = None,
        name: str = "task",
    ) -> None:
        if receives not in _RECEIVES:
            raise ValueError(f"receives={receives!r}: must be one of {', '.join(_RECEIVES)}")
        self.fn = resolve_callable(fn)
        self.fn_name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.receives = receives
        self.kwargs = dict(kwargs or {})
        self.name = name
        self._dense: dict[str, float] = {}
        self.wants_dense = _takes_dense(self.fn)

    def summary(self, metrics: Mapping[str, float]) -> Metrics:
        """Each metric on the sparsified data (``<name>_<m>``) and its change from dense
        (``<name>_<m>_delta``)."""
        out: Metrics = {}
        for key, value in metrics.items():
            head, _, tail = key.rpartition("/")
            prefix, _, metric = head.partition("/")
            if prefix == self.name and metric and tail in ("sparse", "delta"):
                short = f"{self.name}_{metric}" + ("_delta" if tail == "delta" else "")
                out[short.replace("/", "_")] = value
        return out

    def _subject(self, ctx: EvalContext) -> Any:
        if self.receives == "model" or (self.receives == "auto" and ctx.model is not None):
            if ctx.model is None:
                raise ValueError(
                    f"{self.name}: receives=model but the data source built no model "
                    "(use data=model, or receives=data for the named data)"
                )
            return ctx.model
        return dict(ctx.named_data)

    def _call(self, ctx: EvalContext) -> dict[str, float]:
        kwargs = dict(self.kwargs)
        if self.wants_dense:
            if ctx.dense is None:
                raise RuntimeError(f"{self.name}: the runner gave no dense reference")
            use_model = self.receives == "model" or (
                self.receives == "auto" and ctx.model is not None
            )
            kwargs["dense"] = ctx.dense.model if use_model else dict(ctx.dense.named_data)
        with torch.no_grad():
            result = self.fn(self._subject(ctx), **kwargs)
        if not isinstance(result, Mapping):
            raise TypeError(
                f"{self.name}: {self.fn_name} returned {type(result).__name__}, "
                "expected a dict of metric name -> number"
            )
        out = {}
        for key, value in result.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{self.name}: {self.fn_name} returned {key}={value!r}, expected a number"
                )
            out[str(key)] = float(value)
        return out

    def on_start(self, ctx: EvalContext) -> Metrics:
        if self.wants_dense:  # the callable compares with the dense model itself, at the end
            return {}
        self._dense = self._call(ctx)
        return {metric_key(self.name, k, "dense"): v for k, v in self._dense.items()}

    def on_step(self, ctx: EvalContext) -> Metrics:
        """The callable on the masked data: a model's forward sees the masked weights while
        it trains (``train=...``); other data is measured as it is."""
        return {metric_key(self.name, k, "sparse"): v for k, v in self._call(ctx).items()}

    def on_end(self, ctx: EvalContext) -> Metrics:
        sparse = self._call(ctx)
        metrics = {metric_key(self.name, k, "sparse"): v for k, v in sparse.items()}
        for key, value in sparse.items():
            dense = self._dense.get(key)
            if dense is not None and math.isfinite(dense) and math.isfinite(value):
                metrics[metric_key(self.name, key, "delta")] = value - dense
        return metrics
