"""Builds a job's objects from its validated config: the data, the sparsifier holding it
(``add_data`` with each name's per-name config), the scheduler and the evaluators."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparsify_exp.runner.calibration.checks import is_none
from sparsify_exp.runner.calibration.collect import Calibrated, calibrate
from sparsify_exp.runner.config import evaluator_nodes
from sparsify_exp.runner.data import DataBundle
from sparsify_exp.sparsifier import count_nonfinite
from sparsify_exp.streaming import add_mapped

log = logging.getLogger("sparsify_exp.runner")


@dataclass
class Built:
    """What a job steps: ``added`` are the names given to the sparsifier, ``skipped`` those
    that per-name rules kept dense."""

    bundle: DataBundle
    sparsifier: Any
    added: dict[str, Any]
    skipped: list[str]
    scheduler: Any
    evaluators: dict[str, Any]
    nonfinite: dict[str, int]
    """NaN / inf entries of each added name that has any."""
    train_fn: Any = None
    """The ``train.fn`` callable (see :mod:`~sparsify_exp.runner.train.loop`), or None."""
    calibration: dict[str, float] = field(default_factory=dict)
    """``calibration/*`` metrics of the pass before the first step (empty: none ran)."""


def per_name_config(name: str, rules: list[Mapping]) -> tuple[bool, dict]:
    """``(skip, add_data config)`` for ``name``: every matching rule applies, later keys win."""
    skip, conf = False, {}
    for rule in rules:
        if fnmatchcase(name, rule["pattern"]):
            skip = skip or bool(rule.get("skip"))
            conf.update(rule.get("config") or {})
    return skip, conf


def build(cfg: DictConfig, rules: list[Mapping], seed: int) -> Built:
    torch.manual_seed(seed)
    bundle = instantiate(cfg.data, _convert_="all")
    sp = instantiate(cfg.sparsifier, _convert_="all")
    plan: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for name in bundle.named_data:
        skip, conf = per_name_config(name, rules)
        if skip:
            skipped.append(name)
        else:
            plan[name] = conf
    calibrated = _calibrate(cfg, bundle, sp, list(plan))
    added: dict[str, Any] = {}
    for name, conf in plan.items():
        obj = bundle.named_data[name]
        conf = {**conf, **calibrated.config.get(name, {})}  # the statistics it needs
        if bundle.mapped is not None:  # the mask at 1 bit an entry, the data never written
            add_mapped(sp, name, obj, **conf)
        else:
            sp.add_data(name, obj, **conf)
        added[name] = obj
    for i, rule in enumerate(rules):
        if not any(fnmatchcase(n, rule["pattern"]) for n in bundle.named_data):
            log.warning(
                "per_name.rules[%d].pattern=%s matches no name of the data", i, rule["pattern"]
            )
    if not added:
        raise ValueError(
            f"per_name rules skip every name ({len(skipped)}); nothing left to sparsify"
        )
    _warn_whole_tensor_blocks(sp, added)
    nonfinite = {n: c for n in added if (c := count_nonfinite(added[n]))}
    for name, count in nonfinite.items():
        log.warning(
            "%s holds %d NaN/inf entries: blocks holding them rank above every finite block "
            "(removed last; see DataNormSparsifier)",
            name,
            count,
        )
    node = cfg.schedule.scheduler
    scheduler = instantiate(node, data_sparsifier=sp, _convert_="all") if node is not None else None
    evaluators = {
        name: instantiate(node, _convert_="all")
        for name, node in evaluator_nodes(cfg.get("eval")).items()
    }
    train_node = cfg.train.get("fn") if cfg.get("train") is not None else None
    train_fn = instantiate(train_node, _convert_="all") if train_node is not None else None
    return Built(
        bundle, sp, added, skipped, scheduler, evaluators, nonfinite, train_fn, calibrated.metrics
    )


def _calibrate(cfg: DictConfig, bundle: DataBundle, sp: Any, names: list[str]) -> Calibrated:
    """The statistics the sparsifier declares, from ``cfg.calibration``'s batches (none:
    nothing ran; validation made sure the sparsifier needs none then)."""
    node = cfg.get("calibration")
    if is_none(node) or not names:
        return Calibrated({}, {})
    source = instantiate(node, _convert_="all")
    progress = str(cfg.output.get("progress", "auto")) if cfg.get("output") else "auto"
    return calibrate(source, bundle, sp, names, progress)


def _warn_whole_tensor_blocks(sp: Any, added: Mapping[str, Any]) -> None:
    """A block at least as large as a tensor makes it one block: kept or removed whole."""
    for name in added:
        block = sp.data_groups[name].get("sparse_block_shape")
        if not block:
            continue
        data = sp.get_data(name, return_original=True)
        rows, cols = (1, data.numel()) if data.dim() < 2 else (data.shape[0], data[0].numel())
        if block[0] >= rows and block[1] >= cols and rows * cols > 1:
            log.warning(
                "sparse_block_shape=%s covers all of %s (%dx%d): it is one block, kept or "
                "removed whole",
                list(block),
                name,
                rows,
                cols,
            )
