"""The bitmask folder in transformers 4.55 + compressed-tensors 0.11, the last pair that loads
``sparse-bitmask`` folders by itself, in its own virtualenv (the project's own dependencies
stay current). Slow: it builds the virtualenv (torch comes from this one, through a .pth
file) unless ``SPARSIFY_EXP_OLD_HF_VENV`` names one that has the pair."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import tiny_bert

from sparsify_exp import load_sparse
from sparsify_exp.runner import run_overrides

PAIR = ("transformers==4.55.4", "compressed-tensors==0.11.0", "accelerate<1.11")


#: What the old virtualenv takes from this one (by symbolic links): torch and what it imports.
SHARED = (
    "torch", "torchgen", "functorch", "numpy", "numpy.libs", "sympy", "mpmath", "networkx",
    "jinja2", "markupsafe", "filelock", "fsspec", "typing_extensions", "safetensors",
)  # fmt: skip


def _shared_packages(target: Path) -> None:
    """Links this environment's torch (and its dependencies, with their metadata, so pip
    sees them installed) into ``target``: nothing else of this environment leaks in."""
    source = Path(torch.__file__).resolve().parents[1]
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        stem = item.name.split("-")[0].removesuffix(".py").lower()
        if stem in SHARED or stem.replace("_", "-") in SHARED:
            link = target / item.name
            if not link.exists():
                link.symlink_to(item)


def _old_venv(root: Path) -> Path:
    """A virtualenv with the old pair that sees this environment's torch and safetensors."""
    given = os.environ.get("SPARSIFY_EXP_OLD_HF_VENV")
    venv = Path(given) if given else root / "old-hf"
    python = venv / "bin" / "python"
    if given and python.is_file():
        return python
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    shared = venv / "shared"
    command = (
        f"{sys.executable} -m venv {venv} && echo {shared} > "
        f"{venv}/lib/{version}/site-packages/shared.pth && "
        f"{python} -m pip install {' '.join(PAIR)}"
    )
    try:
        subprocess.run(
            f"{sys.executable} -m venv {venv}", shell=True, check=True, capture_output=True
        )
        _shared_packages(shared)
        (venv / "lib" / version / "site-packages" / "shared.pth").write_text(f"{shared}\n")
        subprocess.run(
            [str(python), "-m", "pip", "install", *PAIR],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(
            f"could not build the old transformers virtualenv ({e}); build one with "
            f"{command} (torch linked in) and set SPARSIFY_EXP_OLD_HF_VENV to it"
        )
    return python


@pytest.mark.slow
def test_transformers_4_55_loads_the_bitmask_folder_with_automodel_alone(store, tmp_path):
    python = _old_venv(tmp_path)
    folder = tiny_bert(tmp_path / "bert")
    run_overrides(
        [
            "mlflow.mask_images=0",
            "eval=[]",
            "data=hf",
            f"data.path={folder}",
            "sparsifier=magnitude",
            "output.format=bitmask",
        ],
        output_dir=tmp_path / "job",
    )
    out = tmp_path / "job" / "artifacts" / "data" / "sparsified"
    script = textwrap.dedent(
        f"""
        import torch, transformers, compressed_tensors
        from transformers import AutoModel
        print(transformers.__version__, compressed_tensors.__version__)
        model = AutoModel.from_pretrained({str(out)!r})
        torch.save(model.state_dict(), {str(tmp_path / "old.pt")!r})
        """
    )
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("4.55.4 0.11.0")
    old = torch.load(tmp_path / "old.pt")
    ours = load_sparse(out)
    for name, tensor in ours.items():
        assert torch.equal(old[name], tensor), name
