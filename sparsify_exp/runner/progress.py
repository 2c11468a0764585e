"""What a person reads on the terminal: the steps' progress (tqdm on a terminal, a few plain
log lines otherwise); sizes in decimal units (:func:`sparsify_exp.units.human_bytes`)."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping

from sparsify_exp.units import human_bytes

__all__ = ["Progress", "human_bytes", "percent"]

log = logging.getLogger("sparsify_exp.runner")


class Progress:
    """``mode``: ``auto`` (a bar on a terminal, else log lines), ``bar``, ``log`` or ``none``."""

    def __init__(self, mode: str, steps: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.steps, self.bar = mode, steps, None
        self.every = max(1, steps // 10)
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc="sparsify", unit="step")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        sparsity = metrics.get("sparsity/overall", float("nan"))
        churn = metrics.get("churn/overall")
        if self.bar is not None:
            post = {"sparsity": percent(sparsity)}
            if churn is not None:
                post["churn"] = percent(churn)
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (step % self.every == 0 or step == self.steps - 1):
            extra = f"  churn {percent(churn)}" if churn is not None else ""
            log.info("step %d/%d  sparsity %s%s", step + 1, self.steps, percent(sparsity), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def percent(fraction: float) -> str:
    """Enough digits that a small fraction is not shown as 0 (0.004%, 12.5%)."""
    if not math.isfinite(fraction) or fraction in (0.0, 1.0):
        return f"{fraction:.0%}"
    digits = max(1, min(6, 1 - math.floor(math.log10(fraction * 100))))
    return f"{fraction * 100:.{digits}f}%"
