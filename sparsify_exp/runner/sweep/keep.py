"""Which sparsified checkpoints a run keeps, and writing one again from its masks.

A sweep's jobs keep their masks (1 bit an entry) but, with ``output.write_data=auto``, not
their sparsified checkpoints: each job writes its checkpoint to measure its size and removes
it, and when the sweep ends its pick's checkpoint is written again from the pick's masks and
logged to the pick's run. Any other job's checkpoint is one command away::

    python -m sparsify_exp.materialize <job dir> [--format bitmask] [--log]

Where the MLflow artifact store is a local folder, the job folder's copy of each logged file
(masks, checkpoint, tables) becomes a symbolic link to the artifact: one copy on disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

log = logging.getLogger("sparsify_exp.runner")

CONFIG = Path("artifacts") / "config" / "config.yaml"
MASKS = Path("artifacts") / "masks" / "final.safetensors"
DATA = Path("artifacts") / "data"


def materialize(job_dir: Path, out_format: str | None = None) -> Path:
    """Builds the job's data again from its saved config, applies its final masks and writes
    the sparsified checkpoint to ``<job dir>/artifacts/data/`` in ``out_format`` (the job's
    ``output.format`` when None); returns the written file."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sparsify_exp.masks import load_masks
    from sparsify_exp.runner.artifacts import storage_sizes, write_data
    from sparsify_exp.runner.data import as_tensor

    job_dir = Path(job_dir)
    for needed in (CONFIG, MASKS):
        if not (job_dir / needed).is_file():
            raise FileNotFoundError(f"{job_dir}: no {needed} (not a finished job folder)")
    cfg = OmegaConf.load(job_dir / CONFIG)
    out_format = out_format or str(OmegaConf.select(cfg, "output.format", default="dense"))
    torch.manual_seed(int(cfg.seed))
    bundle = instantiate(cfg.data, _convert_="all")
    if bundle.mapped is not None:
        raise ValueError(f"{job_dir}: memory-mapped data is written by the run itself")
    masks = load_masks(job_dir / MASKS)
    with torch.no_grad():
        for name, mask in masks.items():
            as_tensor(bundle.named_data[name]).masked_fill_(~mask, 0)
    kept = {n: int(m.count_nonzero()) for n, m in masks.items()}
    sizes = storage_sizes(bundle, {n: bundle.named_data[n] for n in masks}, kept)
    return write_data(bundle, None, masks, out_format, job_dir / DATA, sizes)


def _local_artifacts(artifact_uri: str) -> Path | None:
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(unquote(parsed.path)).absolute()


def link_logged_data(client: Any, run_id: str, job_dir: Path) -> int:
    """Replaces the job folder's files under ``artifacts/`` (masks, checkpoint, tables) by
    symbolic links to their logged copies when the artifact store is a local folder; returns
    the files linked. A file whose logged copy is missing or differs in size stays."""
    local = Path(job_dir) / "artifacts"
    store = _local_artifacts(client.get_run(run_id).info.artifact_uri)
    if store is None or not local.is_dir():
        return 0
    linked = 0
    for file in sorted(p for p in local.rglob("*") if p.is_file() and not p.is_symlink()):
        target = store / file.relative_to(local)
        if target.is_file() and target.stat().st_size == file.stat().st_size:
            file.unlink()
            file.symlink_to(target)
            linked += 1
    if linked:
        log.info("%s: %d file(s) linked to the run's artifacts in %s", local, linked, store)
    return linked


def keep_pick(client: Any, run_id: str) -> Path | None:
    """Writes the picked child's checkpoint again and logs it to its run as ``data/``."""
    run = client.get_run(run_id)
    job_dir = Path(run.data.tags.get("sparsify.job_dir", ""))
    if not (job_dir / MASKS).is_file():
        log.warning("the pick's job folder %s has no masks: its checkpoint is not written", job_dir)
        return None
    path = materialize(job_dir)
    client.log_artifacts(run_id, str(job_dir / DATA), "data")
    link_logged_data(client, run_id, job_dir)
    log.info("the pick's checkpoint %s is logged to its run %s as data/", path, run_id)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify_exp.materialize",
        description="Write a finished job's sparsified checkpoint from its saved masks.",
    )
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--format", choices=("dense", "bitmask", "rows"), default=None)
    parser.add_argument("--log", action="store_true", help="log it to the job's MLflow run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = materialize(args.job_dir, args.format)
        if args.log:
            import json

            from mlflow.tracking import MlflowClient

            from sparsify_exp.runner.train.resume import RUN_FILE

            info = json.loads((args.job_dir / RUN_FILE).read_text())
            client = MlflowClient(tracking_uri=info["tracking_uri"])
            client.log_artifacts(info["run_id"], str(args.job_dir / DATA), "data")
            link_logged_data(client, info["run_id"], args.job_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
