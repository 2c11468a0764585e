"""The calibration checks that run before any run exists: a sparsifier that needs statistics
without a calibration option, and a calibration option the data source cannot feed."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["calibration_problems", "is_none"]


def is_none(node: Any) -> bool:
    """``calibration=none``: an empty node (or none at all)."""
    return not node


def _data_module(c: Mapping[str, Any]) -> Any:
    target = str((c.get("data") or {}).get("_target_", ""))
    try:
        return importlib.import_module(target.rpartition(".")[0])
    except Exception:
        return None


def _tokenizer_known_missing(module: Any, data: Mapping[str, Any]) -> bool:
    """A source's ``has_tokenizer(**data config)`` says False (not merely unknown)."""
    check = getattr(module, "has_tokenizer", None)
    if check is None:
        return False
    try:
        return check(**{k: v for k, v in data.items() if not k.startswith("_")}) is False
    except Exception:
        return False


def calibration_problems(
    c: Mapping[str, Any], sparsifier: Any, calibration_fn: Any
) -> list[tuple[str, Any, str]]:
    """``(key, value, message)`` for each problem; ``calibration_fn`` is the imported
    ``calibration._target_`` (None for ``calibration=none`` or when it did not import)."""
    from sparsify_exp.runner.calibration.sources import TextCalibration

    node = c.get("calibration")
    needs = tuple(getattr(sparsifier, "calibration_needs", ()) or ())
    problems: list[tuple[str, Any, str]] = []
    if is_none(node):
        if needs:
            problems.append(
                (
                    "calibration",
                    "none",
                    f"{type(sparsifier).__name__} needs {', '.join(needs)} from calibration "
                    "data: add calibration=text (a language model with its tokenizer) or "
                    "calibration=batches (model inputs from a _target_)",
                )
            )
        return problems
    module = _data_module(c)
    source = module.__name__.rsplit(".", 1)[-1] if module is not None else "?"
    if module is not None and getattr(module, "MODEL", None) is False:
        problems.append(
            (
                "calibration._target_",
                node.get("_target_"),
                f"calibration runs inputs through a model, and this data source ({source}) "
                "holds tensors without one: use a data source with a model (data=model, "
                "data=dlrm) or calibration=none",
            )
        )
    elif (
        isinstance(calibration_fn, type)
        and issubclass(calibration_fn, TextCalibration)
        and module is not None
        and getattr(module, "TOKENIZER", False) is True
        and _tokenizer_known_missing(module, c["data"])
    ):
        problems.append(
            (
                "calibration._target_",
                node.get("_target_"),
                f"calibration=text tokenizes with the model's tokenizer, and "
                f"data.path={c['data'].get('path')} has no tokenizer files: add them to the "
                "model folder, or use calibration=batches",
            )
        )
    elif (
        isinstance(calibration_fn, type)
        and issubclass(calibration_fn, TextCalibration)
        and module is not None
        and getattr(module, "TOKENIZER", False) is not True
    ):
        problems.append(
            (
                "calibration._target_",
                node.get("_target_"),
                f"calibration=text tokenizes with the model's tokenizer, and this data source "
                f"({source}) has none: use a language model's data source, or "
                "calibration=batches with inputs the model takes",
            )
        )
    return problems
