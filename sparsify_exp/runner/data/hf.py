"""``data=hf``: a Hugging Face model (a local folder or a hub id) loaded with ``transformers``.

Names are the model's ``named_parameters()`` names (``encoder.layer.0.attention.self.query.
weight``). ``include`` entries are glob patterns on them, and the entry ``blocks`` stands for
the weights of the ``nn.Linear`` modules (and GPT-2's ``Conv1D``) inside the transformer
blocks: the repeated modules of an ``nn.ModuleList`` (``encoder.layer.N``, ``model.layers.N``,
``transformer.h.N``), so no embeddings, norms, biases, poolers or heads. The tokenizer, when
the model has one, is the bundle's ``tokenizer`` (evaluators and calibration read it there).

The sparsified model is written as a Hugging Face folder (``sparsified/``): the weights as
``model.safetensors`` (dense, or in the ``output.format`` layout), the config and the
tokenizer and the other small files of the input folder copied.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, validate_call
from torch import nn

from sparsify_exp.atomic import atomic_write_text
from sparsify_exp.runner.data import DataBundle, select_names, write_safetensors

log = logging.getLogger("sparsify_exp.runner")

BLOCKS = "blocks"
MODEL = True  # calibration runs its inputs through the model
TOKENIZER = True  # the folder's tokenizer, when it has one (see has_tokenizer)
EXTRA = "pip install 'sparsify-exp[hf]'"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_transformers() -> Any:
    """``transformers``, or a one-line error naming the extra that installs it."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"data=hf needs transformers: {EXTRA}")
    import transformers

    return transformers


def _model_path(path: str) -> str:
    """A folder with a ``config.json``, or a hub id (checked when it loads); transformers
    installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"needs transformers: {EXTRA}")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError("must be a model folder (with config.json) or a hub id, not a file")
        if not (p / "config.json").is_file():
            raise ValueError(f"no config.json in {p.resolve()}: not a Hugging Face model folder")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"no such folder ({p.resolve()})")
    return path


def _auto_class(name: str) -> str:
    if not name.startswith("Auto"):
        raise ValueError("must be a transformers Auto class (AutoModel, AutoModelForCausalLM, ...)")
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        if not hasattr(transformers, name):
            raise ValueError("no such class in transformers")
    return name


def block_linear_weights(model: nn.Module) -> list[str]:
    """The ``.weight`` names of the linear modules inside the transformer blocks: modules under
    an ``nn.ModuleList`` of at least two modules of one class."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                blocks.append(f"{name}.")
    out = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if linear and any(name.startswith(b) for b in blocks):
            out.append(f"{name}.weight")
    return out


@dataclass
class HFBundle(DataBundle):
    """A Hugging Face model; ``save`` / ``save_sparse`` write a model folder."""

    folder: Path | None = None
    """The input folder (a local path, or the hub snapshot), whose small files are copied."""
    sparsity_targets: list[str] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model's state_dict without tied aliases (what ``save_pretrained`` writes): a
        weight shared by two names (embeddings and an LM head) is written once."""
        assert self.model is not None
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        state = dict(self.model.state_dict())
        ordered = [*[n for n in self.named_data if n in state], *state]
        for name in dict.fromkeys(ordered):
            t = state[name]
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            out[name] = t
        return out

    def _folder(self, stem: Path) -> Path:
        folder = stem
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if self.folder is not None:
            for item in self.folder.iterdir():
                weights = item.suffix in WEIGHT_SUFFIXES or item.name.endswith(".index.json")
                if item.name == "config.json" or weights or item.name.startswith("."):
                    continue
                if item.is_dir():
                    if item.name not in ("onnx", "openvino"):
                        shutil.copytree(item, folder / item.name)
                else:
                    shutil.copy2(item, folder / item.name)
        assert self.model is not None
        self.model.config.save_pretrained(folder)
        if self.tokenizer is not None and not any((folder / f).exists() for f in TOKENIZER_FILES):
            self.tokenizer.save_pretrained(folder)
        return folder

    def save(self, stem: Path, masks: Any = None) -> Path:
        folder = self._folder(stem)
        path = folder / "model.safetensors"
        write_safetensors(self.tensors(), path, metadata={"format": "pt"})
        return path

    def save_sparse(
        self, stem: Path, masks: Mapping[str, torch.Tensor], layout: str
    ) -> tuple[Path, dict[str, str]]:
        from sparsify_exp.sparse_format import BITMASK, save_sparse

        folder = self._folder(stem)
        path = folder / "model.safetensors"
        layouts = save_sparse(self.tensors(), path, masks, layout=layout)
        if layout == BITMASK:
            _write_compression_config(folder / "config.json", masks, layouts)
        return path, layouts


def _write_compression_config(
    config: Path, masks: Mapping[str, torch.Tensor], layouts: Mapping[str, str]
) -> None:
    """The ``quantization_config`` entry compressed-tensors 0.11-0.14 wrote for a
    ``sparse-bitmask`` model, so transformers < 4.56 with those versions decompresses the
    folder by itself."""
    encoded = [n for n, kind in layouts.items() if kind == "sparse-bitmask"]
    total = sum(int(masks[n].numel()) for n in masks) or 1
    removed = sum(int(masks[n].numel() - masks[n].count_nonzero()) for n in masks)
    data = json.loads(config.read_text())
    data["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.11.0",
        "sparsity_config": {
            "format": "sparse-bitmask",
            "global_sparsity": removed / total,
            "sparsity_structure": "unstructured",
            "targets": sorted(n.removesuffix(".weight") for n in encoded),
            "ignore": [],
        },
        "transform_config": {},
    }
    atomic_write_text(config, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)


def has_tokenizer(path: Any = None, **_: object) -> bool | None:
    """Whether the model at ``path`` comes with a tokenizer, known before loading it for a
    local folder (``None`` for a hub id): calibration=text checks it up front."""
    folder = Path(str(path)).expanduser() if isinstance(path, str) else None
    if folder is None or not folder.is_dir():
        return None
    return _has_tokenizer(folder)


@validate_call
def build(
    path: Annotated[str, AfterValidator(_model_path)],
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    auto_class: Annotated[str, AfterValidator(_auto_class)] = "AutoModel",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    trust_remote_code: bool = False,
) -> HFBundle:
    """Loads the model at ``path`` with ``transformers.<auto_class>.from_pretrained`` and
    selects its parameters (``include``: globs, ``blocks`` for the Linear weights in the
    transformer blocks; default ``[blocks]``)."""
    transformers = require_transformers()
    kwargs: dict[str, Any] = {
        "revision": revision,
        "local_files_only": local_files_only,
        "trust_remote_code": trust_remote_code,
    }
    model = getattr(transformers, auto_class).from_pretrained(
        path, dtype=DTYPES.get(dtype, "auto"), **kwargs
    )
    model.eval()
    folder = Path(path).expanduser()
    if not folder.is_dir():  # a hub id: the snapshot transformers downloaded
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, revision=revision, local_files_only=True))
    tokenizer = None
    if _has_tokenizer(folder):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    else:
        log.info("%s has no tokenizer: evaluators that read text cannot run on it", path)
    params = dict(model.named_parameters())
    patterns = list(include) if include is not None else [BLOCKS]
    blocks = block_linear_weights(model) if BLOCKS in patterns else []
    globs = [p for p in patterns if p != BLOCKS]
    chosen = set(blocks) | set(select_names(params, globs, None) if globs else [])
    names = select_names([n for n in params if n in chosen], None, exclude)
    names = [n for n in names if params[n].is_floating_point() and params[n].dim() >= 1]
    if not names:
        raise ValueError(
            f"data.include={patterns} / data.exclude={list(exclude or [])} select no parameter "
            f"of {path} (e.g. {', '.join(list(params)[:8])})"
        )
    return HFBundle(
        named_data={n: params[n] for n in names},
        model=model,
        source=str(path),
        tokenizer=tokenizer,
        folder=folder,
    )
