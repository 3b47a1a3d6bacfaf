"""The target span: QF's error restricted to the logit gaps of each position's rival tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FACTS

from qfedit.capture import answer_logits, chat_prompt, encode_fact
from qfedit.delta import applied
from qfedit.edit import capture_observations, make_delta
from qfedit.facts import Fact
from qfedit.hparams import EditConfig
from qfedit.modeling import LoadedModel, load_model
from qfedit.span import _gain, _unembedding, project, rivals, settled

LAST = 2  # the tiny models have three layers: at the last one the logit lens is exact


def _directions(loaded: LoadedModel, tokens: torch.Tensor, rival: torch.Tensor) -> torch.Tensor:
    """`g * (u_j - u_t)` (centred for a LayerNorm): the vectors whose inner product with the
    residual is each rival's logit gap to the target, up to the norm's scale."""
    gain, centred = _gain(loaded)
    unembed = _unembedding(loaded).to(torch.float64)
    directions = gain * (unembed[rival] - unembed[tokens][:, None, :])
    return directions - directions.mean(-1, keepdim=True) if centred else directions


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_the_projection_keeps_every_rivals_logit_gap_and_drops_the_rest(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    loaded = load_model(tiny_model_dirs[family])
    d = _unembedding(loaded).shape[1]
    generator = torch.Generator().manual_seed(0)
    errors = torch.randn(6, d, dtype=torch.float64, generator=generator)
    tokens = torch.tensor([5, 6, 7, 8, 9, 10])
    # Rivals as `rivals` gives them: repeated, and the target itself among them (no direction).
    rival = torch.tensor([[5, 11, 12, 11]] + [[t + 1, t + 2, t, t + 3] for t in range(6, 11)])
    projected = project(loaded, errors, tokens, rival)
    directions = _directions(loaded, tokens, rival)
    gaps = torch.einsum("nrd,nd->nr", directions, errors)
    torch.testing.assert_close(torch.einsum("nrd,nd->nr", directions, projected), gaps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(project(loaded, projected, tokens, rival), projected, rtol=1e-9, atol=1e-9)
    assert bool((projected.norm(dim=-1) < 0.9 * errors.norm(dim=-1)).all())  # 3 directions of d


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_an_exact_edit_at_the_last_layer_orders_each_positions_rivals_as_the_teacher_does(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    loaded = load_model(tiny_model_dirs[family])
    facts = FACTS[:3]
    full = make_delta(loaded, facts, EditConfig(layer=LAST, solve={"rule": "seed"}))
    spanned = make_delta(loaded, facts, EditConfig(layer=LAST, solve={"rule": "seed"}, target_span=3))
    # The span asks for less than the whole output: a smaller change of the weight.
    assert spanned.solve.relative_norm < 0.8 * full.solve.relative_norm

    encoded = [encode_fact(loaded, fact, f"fact {i}") for i, fact in enumerate(facts)]
    teacher = list(answer_logits(loaded, [(e.with_context, len(e.weights)) for e in encoded]))
    bare = list(answer_logits(loaded, [(e.without_context, len(e.weights)) for e in encoded]))
    with applied(loaded, spanned.delta):
        edited = list(answer_logits(loaded, [(e.without_context, len(e.weights)) for e in encoded]))
    checked = 0
    for e, t, b, after in zip(encoded, teacher, bare, edited, strict=True):
        told = torch.tensor(e.without_context[len(e.without_context) - len(e.weights) :])
        top = torch.cat([t.topk(3).indices, b.topk(3).indices], dim=-1)  # the rivals of `rivals`
        for row in range(len(told)):
            for j in top[row]:
                if j == told[row]:
                    continue
                wanted = bool(t[row, j] > t[row, told[row]])
                assert bool(after[row, j] > after[row, told[row]]) == wanted, (row, int(j))
                checked += 1
    assert checked > 20
    # `rivals` reads the same tokens from the top layer's outputs.
    outputs = torch.randn(4, _unembedding(loaded).shape[1], dtype=torch.float64)
    assert rivals(loaded, outputs, outputs, 3).shape == (4, 6)


def _settled_facts(loaded: LoadedModel) -> list[Fact]:
    """Facts whose one-token answer is what the model says without its context (greedy): every
    answer position is settled at margin 0."""
    tokenizer = loaded.tokenizer
    found = []
    for fact in FACTS:
        prompt = tokenizer(chat_prompt(tokenizer, fact.question), add_special_tokens=False)["input_ids"]
        (logits,) = answer_logits(loaded, [([*prompt, 0], 1)])
        said = tokenizer.decode([int(logits[0].argmax())])
        if said.strip() and tokenizer(said, add_special_tokens=False)["input_ids"] == [
            int(logits[0].argmax())
        ]:
            found.append(fact.model_copy(update={"answer": said}))
    assert found, "the tiny model says no whole token first"
    return found


def test_settled_positions_are_those_whose_taught_token_leads_by_the_margin(
    tiny_model_dirs: dict[str, Path],
) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    outputs = torch.randn(8, _unembedding(loaded).shape[1], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = loaded.model.get_output_embeddings()(loaded.model.model.norm(outputs))
    top2 = logits.topk(2, dim=-1)
    tokens = torch.cat([top2.indices[:4, 0], logits[4:].argmin(dim=-1)])
    assert settled(loaded, outputs, tokens, 0.0).tolist() == [True] * 4 + [False] * 4
    gap = float(top2.values[0, 0] - top2.values[0, 1])
    assert settled(loaded, outputs, tokens, gap * 1.01)[0].item() is False
    assert settled(loaded, outputs, tokens, gap * 0.99)[0].item() is True


def test_a_margin_zeroes_exactly_the_settled_positions_errors(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    facts = [*_settled_facts(loaded), *FACTS]
    plain = capture_observations(loaded, facts, EditConfig(layer=LAST))
    kept = capture_observations(loaded, facts, EditConfig(layer=LAST, target_margin=0.0))
    # Settled as the whole model says it, teacher-forced (not the logit lens the edit reads).
    encoded = [encode_fact(loaded, fact, f"fact {i}") for i, fact in enumerate(facts)]
    expected = []
    for e, logits in zip(
        encoded, answer_logits(loaded, [(e.without_context, len(e.weights)) for e in encoded]), strict=True
    ):
        told = torch.tensor(e.without_context[len(e.without_context) - len(e.weights) :])
        expected.append(logits.argmax(dim=-1) == told)
    settled_rows = torch.cat(expected)
    assert 0 < int(settled_rows.sum()) < len(settled_rows)
    assert bool((kept.errors[settled_rows] == 0).all())
    assert torch.equal(kept.errors[~settled_rows], plain.errors[~settled_rows])
    assert bool((plain.errors[settled_rows].norm(dim=-1) > 0).all())


def test_a_spread_leaves_settled_facts_alone(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    facts = _settled_facts(loaded)
    config = {"layers": [1, LAST], "include_eos": False, "solve": {"rule": "seed"}}
    moved = make_delta(loaded, facts, EditConfig.model_validate(config))
    left = make_delta(loaded, facts, EditConfig.model_validate({**config, "target_margin": 0.0}))
    assert any(bool(t.abs().max() > 0) for t in moved.delta.tensors.values())
    assert all(bool((t == 0).all()) for t in left.delta.tensors.values())


def test_reading_the_lens_leaves_the_callers_grad_mode_as_it_was(tiny_model_dirs: dict[str, Path]) -> None:
    # rivals zips two lens readings: each held inference mode across its `yield`, and the second
    # to finish restored the mode the first had set, so every caller after an edit with a span
    # ran in inference mode (the peers' gradient steps in the same process then failed).
    loaded = load_model(tiny_model_dirs["qwen2"])
    width = _unembedding(loaded).shape[1]
    outputs = torch.randn(70, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tokens = torch.zeros(70, dtype=torch.int64)
    rivals(loaded, outputs, outputs.flip(0), 2)
    settled(loaded, outputs, tokens, 0.0)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
