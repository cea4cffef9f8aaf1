"""The local model: the real all-MiniLM-L6-v2 from its package, run as a NumPy forward pass."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mhv_task._embedding import EmbeddingTimeout, EmbeddingUnavailable
from mhv_task._embedding_local import LocalEmbedder, MiniLMEncoder, packaged_model_dir

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


async def test_vectors_match_the_reference_implementation(local_embedder: LocalEmbedder) -> None:
    # Reference: sentence-transformers on PyTorch (bench/embedding_runtimes.py reference),
    # over short, empty, truncated (> 256 tokens), accented, CJK, emoji and code texts.
    reference = json.loads(REFERENCE.read_text())
    result = await local_embedder.embed(reference["texts"])
    expected = np.asarray(reference["vectors"], dtype=np.float32)
    assert result.vectors.shape == expected.shape == (len(reference["texts"]), 384)
    cosines = (result.vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.999, cosines
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert result.outcome == "local_fallback"


async def test_order_is_kept_whatever_the_batching(local_embedder: LocalEmbedder) -> None:
    texts = [
        "Rotate the signing keys",
        "A much longer description of a task that keeps going " * 6,
        "",
        "Upgrade PostgreSQL",
        "Short",
    ]
    together = (await local_embedder.embed(texts)).vectors
    # Passes of at most 256 padded tokens: every text goes through its own forward pass.
    small = LocalEmbedder(MiniLMEncoder(packaged_model_dir()), model="m", batch_tokens=256)
    try:
        apart = (await small.embed(texts)).vectors
    finally:
        await small.aclose()
    one_by_one = np.stack([(await local_embedder.embed([t])).vectors[0] for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)
    assert np.allclose(apart, one_by_one, atol=1e-5)


async def test_paraphrase_is_nearer_than_an_unrelated_task(local_embedder: LocalEmbedder) -> None:
    query, paraphrase, unrelated = (
        await local_embedder.embed(
            [
                "login page crashes on Safari",
                "Fix authentication failure in WebKit browsers",
                "Reduce initial JavaScript bundle size",
            ]
        )
    ).vectors
    assert query @ paraphrase > query @ unrelated + 0.2


async def test_deadline_is_checked_before_each_pass(local_embedder: LocalEmbedder) -> None:
    with pytest.raises(EmbeddingTimeout):
        await local_embedder.embed(["anything"], timeout=0)


def test_unsupported_model_is_refused_at_load(tmp_path: Path) -> None:
    source = packaged_model_dir()
    for item in source.iterdir():
        target = tmp_path / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        elif item.name == "config.json":
            config = json.loads(item.read_text())
            config["hidden_act"] = "relu"
            target.write_text(json.dumps(config))
        else:
            target.symlink_to(item)
    with pytest.raises(EmbeddingUnavailable, match="unsupported model configuration"):
        MiniLMEncoder(tmp_path)
    with pytest.raises(EmbeddingUnavailable, match="cannot load the model"):
        MiniLMEncoder(tmp_path / "missing")


def test_nothing_can_fetch_a_model_at_run_time() -> None:
    # The hub client that tokenizers and the model package would use to download is left out
    # of the environment (pyproject.toml [tool.uv]); the model comes from the package's files.
    assert importlib.util.find_spec("huggingface_hub") is None
    assert importlib.util.find_spec("sentence_transformers") is None
    assert (packaged_model_dir() / "model.safetensors").stat().st_size > 80_000_000
