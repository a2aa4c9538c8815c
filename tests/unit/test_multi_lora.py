"""Many LoRA adapters in one continuous batch (aiaas.multi_lora in aiaas.llm_engine), against
peft's own forward of each adapter on a tiny random Llama: every request in a mixed batch gets
the tokens its own adapter (or the bare base) gives alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiaas import llm_engine, multi_lora
from aiaas.serving import apps

VOCAB = 128
PROMPTS = [[5, 17, 33, 9, 61, 2], [7, 7, 8, 90, 100, 3, 4, 55], [12, 13]]


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama().save_pretrained(directory)
    words = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
    )
    tokenizer.save_pretrained(directory)
    return directory


def _adapter(base_dir: Path, directory: Path, rank: int, seed: int, targets: list[str]) -> Path:
    """A peft LoRA adapter with random A and B (peft starts B at zero: no effect to test)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        _adapter(base_dir, root / "attention", 4, 1, ["q_proj", "v_proj"]),
        _adapter(base_dir, root / "everywhere", 8, 2, ["q_proj", "k_proj", "o_proj", "down_proj"]),
    ]


def _peft_greedy(base_dir: Path, adapter: Path | None, prompt: list[int], tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
            min_new_tokens=tokens,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def engine(base_dir: Path) -> Iterator[llm_engine.Engine]:
    size = multi_lora.TableSize(2, 8, apps.ADAPTER_TARGETS)
    running = llm_engine.Engine(base_dir, llm_engine.Limits(8, 8, 4096, 64), "cpu", size)
    try:
        yield running
    finally:
        running.close()


def _generate(engine: llm_engine.Engine, prompt: list[int], slot: int | None) -> list[int]:
    async def run() -> list[int]:
        out: list[int] = []
        async for new in engine.generate(prompt, llm_engine.Sampling(10, 0.0), slot):
            out += new
        return out

    return asyncio.run(run())


def test_a_mixed_batch_gives_each_request_its_own_adapters_tokens(
    engine: llm_engine.Engine, base_dir: Path, adapters: list[Path]
) -> None:
    assert engine.adapters is not None
    installed = [
        multi_lora.install(engine.adapters, multi_lora.read(path), path.name) for path in adapters
    ]
    cases = [
        (prompt, which) for prompt in PROMPTS for which in (None, 0, 1)
    ]  # the same prompt under each adapter: no cached prefix may be shared between them

    async def run_all() -> list[list[int]]:
        async def one(prompt: list[int], which: int | None) -> list[int]:
            slot = None if which is None else installed[which].slot
            out: list[int] = []
            async for new in engine.generate(prompt, llm_engine.Sampling(10, 0.0), slot):
                out += new
            return out

        return await asyncio.gather(*(one(p, w) for p, w in cases))

    together = asyncio.run(run_all())
    for (prompt, which), got in zip(cases, together, strict=True):
        expected = _peft_greedy(base_dir, None if which is None else adapters[which], prompt, 10)
        assert got == expected, (prompt, which)
    # The adapters change the answers (else the comparison proves nothing).
    assert len({tuple(t) for t in together[:3]}) == 3
    for held in installed:
        held.drop()
    assert engine.adapters.free_slots == 2


def test_a_slot_is_freed_when_its_holder_and_its_last_lease_let_go(
    engine: llm_engine.Engine, adapters: list[Path]
) -> None:
    assert engine.adapters is not None
    table = engine.adapters
    weights = multi_lora.read(adapters[0])
    first = multi_lora.install(table, weights, "a")
    second = multi_lora.install(table, weights, "b")
    with pytest.raises(multi_lora.NoFreeSlot):
        table.install(weights)
    lease = first.lease()
    assert lease is not None
    first.drop()  # evicted while a stream still uses it
    assert table.free_slots == 0
    assert _generate(engine, PROMPTS[0], lease.slot) == _generate(engine, PROMPTS[0], lease.slot)
    lease.close()
    assert table.free_slots == 1 and first.lease() is None
    second.drop()
    assert table.free_slots == 2


def test_adapters_the_table_cannot_apply_are_refused_with_the_reason(
    engine: llm_engine.Engine, adapters: list[Path], tmp_path: Path
) -> None:
    assert engine.adapters is not None
    dora = tmp_path / "dora"
    dora.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / name).write_bytes((adapters[0] / name).read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(multi_lora.AdapterProblem, match="use_dora"):
        multi_lora.read(dora)

    weights = multi_lora.read(adapters[1])
    too_wide = multi_lora.AdapterWeights(16, 1.0, weights.matrices)
    with pytest.raises(multi_lora.AdapterProblem, match=r"rank 16.*rank 8 at most"):
        engine.adapters.check(too_wide)
    module, (a, b) = next(iter(weights.matrices.items()))
    other_model = multi_lora.AdapterWeights(8, 1.0, {module: (a[:, :32], b)})
    with pytest.raises(multi_lora.AdapterProblem, match="trained on another model"):
        engine.adapters.check(other_model)
    elsewhere = multi_lora.AdapterWeights(8, 1.0, {"lm_head": (a, b)})
    with pytest.raises(multi_lora.AdapterProblem, match="'lm_head'"):
        engine.adapters.check(elsewhere)


def test_a_prompt_cached_by_one_adapter_is_not_reused_by_another(
    engine: llm_engine.Engine, base_dir: Path, adapters: list[Path]
) -> None:
    assert engine.adapters is not None
    held = multi_lora.install(engine.adapters, multi_lora.read(adapters[1]), "b")
    long_prompt = [3 + (7 * i) % (VOCAB - 3) for i in range(300)]  # past one 256-token page
    _generate(engine, long_prompt, None)  # the base's keys and values of the prompt, cached
    got = _generate(engine, long_prompt, held.slot)
    assert got == _peft_greedy(base_dir, adapters[1], long_prompt, 10)
    held.drop()


def test_a_holder_installs_again_for_a_new_version_and_frees_the_old_slot_after_its_streams(
    engine: llm_engine.Engine, adapters: list[Path]
) -> None:
    assert engine.adapters is not None
    table = engine.adapters
    one, two = (multi_lora.read(path) for path in adapters)
    holder = multi_lora.Holder()
    first = holder.lease(table, one, ("1", "base"))
    again = holder.lease(table, one, ("1", "base"))
    assert again.slot == first.slot and table.free_slots == 1  # cached: installed once
    again.close()
    # A promotion: the next request names version 2, which takes a slot of its own, while the
    # stream on version 1 keeps its slot until it ends.
    second = holder.lease(table, two, ("2", "base"))
    assert second.slot != first.slot and table.free_slots == 0
    assert _generate(engine, PROMPTS[1], second.slot) != _generate(engine, PROMPTS[1], first.slot)
    first.close()
    assert table.free_slots == 1
    holder.__del__()  # evicted by the replica's cache while version 2 still streams
    assert table.free_slots == 1
    second.close()
    assert table.free_slots == 2
