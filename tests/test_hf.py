"""``data=hf``: tiny models built from a config (no download), sparsified end to end, written as
a sparse Hugging Face folder, and loaded back with load_sparse and with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import tiny_bert, tiny_gpt2

from sparsify_exp import load_masks, load_sparse
from sparsify_exp.hf import from_pretrained
from sparsify_exp.runner import run_overrides
from sparsify_exp.runner.config import ConfigError

FAST = ["mlflow.mask_images=0"]


def _dense_squash(folder: Path, masks: dict[str, torch.Tensor], auto_class: str = "AutoModel"):
    """The input model's state_dict with each mask applied: what the sparse file must hold."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(str(folder))
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    return state


def test_done_when_command(store, cli, tmp_path):
    """The issue's command on a small BERT built from a config: the bitmask folder loads with
    load_sparse and with transformers, equal to the dense squash, at the logged size."""
    folder = tiny_bert(tmp_path / "bert")
    proc = cli(
        [
            "data=hf",
            f"data.path={folder}",
            "sparsifier=magnitude",
            "eval=[embedding_similarity]",
            "output.format=bitmask",
        ],
        cwd=store.dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = store.runs()
    assert run.info.status == "FINISHED"
    art = Path(run.data.tags["sparsify.job_dir"]) / "artifacts"
    out = art / "data" / "sparsified"
    weights = out / "model.safetensors"
    assert f"written to {weights}" in proc.stdout + proc.stderr
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    m = run.data.metrics
    assert m["size/compressed_bytes"] == weights.stat().st_size
    assert m["size/compressed_bytes"] < 0.85 * m["size/dense_bytes"]
    assert 0.0 < m["embedding_similarity/cosine_mean"] < 1.0
    assert m["embedding_similarity/cosine_p05"] <= m["embedding_similarity/cosine_mean"]
    assert "embedding_similarity/dense" not in m  # nothing spent on dense against dense

    masks = load_masks(art / "masks" / "final.safetensors")
    assert len(masks) == 12  # 6 Linear weights a block, 2 blocks; no embeddings or pooler
    assert all(n.startswith("encoder.layer.") and n.endswith(".weight") for n in masks)
    expected = _dense_squash(folder, masks)
    loaded = load_sparse(out)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    model = from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((out / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask"
    assert sparsity["global_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_tied_lm_head_bf16_and_perplexity(store, tmp_path):
    """A GPT-2 whose LM head is tied to the word embeddings, in bf16, with its word table
    sparsified too: written once, tied again on load; perplexity dense, sparse and ratio."""
    folder = tiny_gpt2(tmp_path / "gpt")
    rid = run_overrides(
        [
            *FAST,
            "data=hf",
            f"data.path={folder}",
            "data.dtype=bfloat16",
            "data.auto_class=AutoModelForCausalLM",
            "data.include=[blocks,transformer.wte.weight]",
            "sparsifier=magnitude",
            "eval=[perplexity]",
            "eval.perplexity.max_samples=16",
            "output.format=bitmask",
        ],
        output_dir=tmp_path / "job",
    )
    run = store.client.get_run(rid)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["perplexity/dense"] > 1.0
    assert m["perplexity/ratio"] == pytest.approx(m["perplexity/sparse"] / m["perplexity/dense"])
    out = tmp_path / "job" / "artifacts" / "data" / "sparsified"
    loaded = load_sparse(out)
    assert "lm_head.weight" not in loaded  # tied: stored once, as save_pretrained does
    assert loaded["transformer.wte.weight"].dtype == torch.bfloat16
    masks = load_masks(tmp_path / "job" / "artifacts" / "masks" / "final.safetensors")
    assert "transformer.wte.weight" in masks and len(masks) == 9
    model = from_pretrained(out, "AutoModelForCausalLM")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    expected = _dense_squash(folder, masks, "AutoModelForCausalLM")
    wte = expected["transformer.wte.weight"].to(torch.bfloat16)
    assert torch.equal(model.lm_head.weight, wte)


def test_folder_without_tokenizer(store, tmp_path):
    folder = tiny_bert(tmp_path / "bert", tokenizer=False)
    rid = run_overrides(
        [*FAST, "data=hf", f"data.path={folder}", "eval=[fidelity]"], output_dir=tmp_path / "a"
    )
    assert store.client.get_run(rid).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="needs the model's tokenizer"):
        run_overrides(
            [*FAST, "data=hf", f"data.path={folder}", "eval=[embedding_similarity]"],
            output_dir=tmp_path / "b",
        )


def test_config_errors_name_the_key(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        run_overrides(
            [
                "data=hf",
                f"data.path={tmp_path / 'empty'}",
                "data.auto_class=Bert",
                "data.dtype=int8",
                "eval=[embedding_similarity]",
                "eval.embedding_similarity.text=nowhere/",
                "output.format=bitmask",
            ],
            output_dir=tmp_path / "job",
        )
    text = str(e.value)
    assert "data.path=" in text and "no config.json" in text
    assert "data.auto_class=Bert: " in text
    assert "data.dtype=int8: " in text
    assert "eval.embedding_similarity.text=nowhere/: " in text or "text=nowhere/" in text
