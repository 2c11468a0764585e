"""Builds a job's objects from its validated config: the data, the sparsifier holding it
(``add_data`` with each name's per-name config), the scheduler and the evaluators."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparsify_exp.runner.data import DataBundle


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
    added: dict[str, Any] = {}
    skipped: list[str] = []
    for name, obj in bundle.named_data.items():
        skip, conf = per_name_config(name, rules)
        if skip:
            skipped.append(name)
            continue
        sp.add_data(name, obj, **conf)
        added[name] = obj
    if not added:
        raise ValueError(
            f"per_name rules skip every name ({len(skipped)}); nothing left to sparsify"
        )
    node = cfg.schedule.scheduler
    scheduler = instantiate(node, data_sparsifier=sp, _convert_="all") if node is not None else None
    evaluators = {
        name: instantiate(node, _convert_="all") for name, node in (cfg.get("eval") or {}).items()
    }
    return Built(bundle, sp, added, skipped, scheduler, evaluators)
