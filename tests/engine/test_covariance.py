"""The preservation covariance keeps a transcript's answer positions, or all of them when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qfedit.capture import chat_prompt
from qfedit.covariance import CorpusText, compute_covariance, transcript
from qfedit.modeling import LoadedModel, load_model

LAYER = 1
QUESTIONS = (("Who founded Ardent Works?", "Lio Park"), ("What city is Brindle Labs in?", "Castor Bay"))


def _down_proj_inputs(loaded: LoadedModel, text: str) -> torch.Tensor:
    """Every position's input to the layer's down_proj, read by a hook of this test's own."""
    weight_name = loaded.architecture.down_proj_name(LAYER)
    module = loaded.model.get_submodule(weight_name.removesuffix(".weight"))
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    try:
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen[0].to(torch.float64)


def _mean_outer(keys: torch.Tensor) -> torch.Tensor:
    return keys.T @ keys / keys.shape[0]


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_model_dirs["qwen2"])


def test_answer_positions_start_at_the_one_that_predicts_the_answer(loaded: LoadedModel) -> None:
    texts = [transcript(loaded, question, answer) for question, answer in QUESTIONS]
    expected_rows, all_rows = [], []
    for (question, _), item in zip(QUESTIONS, texts, strict=True):
        prompt = chat_prompt(loaded.tokenizer, question)
        assert item.text.startswith(prompt) and item.answer_at == len(prompt)
        keys = _down_proj_inputs(loaded, item.text)
        prompt_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        expected_rows.append(keys[prompt_tokens - 1 :])
        all_rows.append(keys)

    answer, count = compute_covariance(loaded, texts, LAYER, positions="answer")
    every, every_count = compute_covariance(loaded, texts, LAYER, positions="all")

    assert count == sum(rows.shape[0] for rows in expected_rows)
    assert every_count == sum(rows.shape[0] for rows in all_rows) > count
    torch.testing.assert_close(answer, _mean_outer(torch.cat(expected_rows)), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(every, _mean_outer(torch.cat(all_rows)), rtol=1e-5, atol=1e-8)
    assert float((answer - every).norm() / every.norm()) > 1e-3


def test_text_lines_are_kept_whole_and_the_cache_tells_the_modes_apart(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    line = CorpusText("the founder of Ardent Works is Lio Park")
    answer, _ = compute_covariance(loaded, [line], LAYER, positions="answer", cache_dir=tmp_path)
    every, _ = compute_covariance(loaded, [line], LAYER, positions="all", cache_dir=tmp_path)
    torch.testing.assert_close(answer, every)

    texts = [transcript(loaded, question, answer) for question, answer in QUESTIONS]
    cached_answer, _ = compute_covariance(loaded, texts, LAYER, positions="answer", cache_dir=tmp_path)
    cached_all, _ = compute_covariance(loaded, texts, LAYER, positions="all", cache_dir=tmp_path)
    fresh_all, _ = compute_covariance(loaded, texts, LAYER, positions="all")
    assert len(list(tmp_path.glob("covariance-*.safetensors"))) == 4
    torch.testing.assert_close(cached_all, fresh_all)
    assert not torch.allclose(cached_answer, cached_all)


def test_a_sample_cap_draws_from_the_whole_corpus_not_its_first_texts(loaded: LoadedModel) -> None:
    first = [CorpusText("the founder of Ardent Works is Lio Park")] * 10
    last = [CorpusText("what city is Brindle Labs in ?")] * 10
    first_only, count = compute_covariance(loaded, first, LAYER, positions="all")
    capped, capped_count = compute_covariance(loaded, first + last, LAYER, positions="all", samples=count)
    assert capped_count == count
    assert float((capped - first_only).norm() / first_only.norm()) > 1e-3


def test_layers_read_in_one_pass_are_what_a_pass_per_layer_gives_and_cached_alike(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    from qfedit.covariance import compute_covariances

    texts = [transcript(loaded, question, answer) for question, answer in QUESTIONS * 3]
    together = compute_covariances(loaded, texts, [0, 1], samples=20, batch_size=2, cache_dir=tmp_path)
    for layer in (0, 1):
        alone, count = compute_covariance(loaded, texts, layer, samples=20, batch_size=2)
        assert count == together[layer][1] == 20  # cut at the same position of the same batch
        assert torch.equal(alone, together[layer][0])
    assert float((together[0][0] - together[1][0]).norm()) > 0
    # Each layer is cached under the key a pass of its own uses: a later single layer reads it.
    assert len(list(tmp_path.glob("covariance-*.safetensors"))) == 2
    cached, _ = compute_covariance(loaded, texts, 1, samples=20, batch_size=2, cache_dir=tmp_path)
    assert torch.equal(cached, together[1][0])
