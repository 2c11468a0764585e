"""What a sweep's parent run is called and tagged: the fixed choices by name, the swept keys
with their values, so the runs list says what was compared (``sweep embeddings: method
magnitude,nm_2_4 x level 0.5,0.7``), and a swept group is never tagged with one option."""

from __future__ import annotations

from collections.abc import Mapping

from sparsify_exp.runner.methods import GROUP as METHOD
from sparsify_exp.runner.methods import NO_METHOD
from sparsify_exp.runner.tracking.store import short_key


def _is_group(key: str) -> bool:
    return "." not in key and "/" not in key


def choice_tags(choices: Mapping[str, object], swept: Mapping[str, str]) -> dict[str, str]:
    """``{group: option}`` for the parent's ``sparsify.choice.*`` tags: a swept group gets its
    swept options (``magnitude,nm_2_4``); the sparsifier is left out when a method (swept or
    not) chose it; ``method: none`` is left out."""
    method = swept.get(METHOD) or str(choices.get(METHOD) or NO_METHOD)
    out = {}
    for group, option in choices.items():
        if group.startswith("hydra") or (group == METHOD and method == NO_METHOD):
            continue
        if group == "sparsifier" and method != NO_METHOD and group not in swept:
            continue
        out[group] = swept.get(group, str(option))
    return out


def sweep_name(choices: Mapping[str, object], swept: Mapping[str, str]) -> str:
    """``sweep magnitude on embeddings: level 0.5,0.7``, or, when the method is swept,
    ``sweep on embeddings: method magnitude,nm_2_4 x level 0.5,0.7``."""
    fixed = choice_tags(choices, swept)
    what = next((fixed[g] for g in (METHOD, "sparsifier") if g in fixed and g not in swept), "")
    data = "" if "data" in swept else f" on {fixed.get('data', '')}" if "data" in fixed else ""
    varied = " x ".join(f"{k if _is_group(k) else short_key(k)} {v}" for k, v in swept.items())
    head = f"sweep {what}".rstrip() + data
    return f"{head}: {varied}" if varied else head
