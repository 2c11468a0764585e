"""Load a sparse Hugging Face folder (``output.format=bitmask`` or ``rows``) with transformers.

transformers 5 refuses ``from_pretrained(folder, state_dict=...)`` and cannot decompress the
``sparse-bitmask`` layout itself (compressed-tensors dropped it in 0.15), so the model is
built from the folder's config and given the weights :func:`~sparsify_exp.load_sparse`
expands::

    from sparsify_exp.hf import from_pretrained

    model = from_pretrained("outputs/.../artifacts/data/sparsified")

Imports transformers only when called (``pip install 'sparsify-exp[hf]'``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sparsify_exp.sparse_format import load_sparse

__all__ = ["from_pretrained"]


def from_pretrained(
    folder: str | os.PathLike, auto_class: str = "AutoModel", dtype: torch.dtype | None = None
) -> Any:
    """The model of ``folder`` (``transformers.<auto_class>``) with its weights loaded from the
    folder's sparse ``.safetensors`` file(s), tied weights tied, in eval mode. ``dtype``:
    the stored weights' dtype when None."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a model folder needs pip install 'sparsify-exp[hf]'") from e
    config = transformers.AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):  # the entry older transformers read
        del config.quantization_config
    state = load_sparse(folder)
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for n, t in model.state_dict().items() if n in state}
    params = model.state_dict()
    untied = [n for n in missing if params[n].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"{folder}: weights do not fit {type(model).__name__} "
            f"(missing: {', '.join(untied[:5]) or '-'}; unexpected: "
            f"{', '.join(unexpected[:5]) or '-'})"
        )
    return model.eval()
