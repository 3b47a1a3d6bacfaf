from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FACTS

from qfedit.capture import CaptureOptions, capture, encode_fact
from qfedit.facts import Fact, FactError
from qfedit.modeling import LoadedModel, load_model


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_model_dirs["qwen2"])


def _hooks(loaded: LoadedModel) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.model.modules())


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_capture_equals_one_fact_at_a_time(
    tiny_model_dirs: dict[str, Path], family: str, side: str
) -> None:
    loaded = load_model(tiny_model_dirs[family])
    batched = capture(loaded, FACTS, 1, options=CaptureOptions(batch_size=8, padding_side=side))  # type: ignore[arg-type]
    single = [capture(loaded, [fact], 1) for fact in FACTS]
    assert batched.positions == sum(c.positions for c in single)
    for name in ("keys_with", "keys_without", "residuals_with", "residuals_without", "weights"):
        joined = torch.cat([getattr(c, name) for c in single])
        assert torch.allclose(getattr(batched, name), joined, rtol=1e-5, atol=1e-5), name
    # Facts' rows come in order, each block the length of its own capture.
    assert batched.fact_index.tolist() == [i for i, c in enumerate(single) for _ in range(c.positions)]


def test_positions_predict_the_answer_and_end_of_turn(qwen: LoadedModel) -> None:
    encoded = encode_fact(qwen, FACTS[1], "fact 2")
    answer_ids = qwen.tokenizer("Mara Velt", add_special_tokens=False)["input_ids"]
    assert encoded.with_context[-len(answer_ids) - 1 :] == [*answer_ids, qwen.tokenizer.eos_token_id]
    assert encoded.without_context[-len(encoded.weights) :] == encoded.with_context[-len(encoded.weights) :]
    assert len(encoded.with_context) > len(encoded.without_context)
    got = capture(qwen, [FACTS[1]], 0)
    assert got.positions == len(answer_ids) + 1


def test_significance_spreads_to_tokens_and_zero_drops_positions(qwen: LoadedModel) -> None:
    fact = FACTS[2].model_copy(update={"significance": (0.0, 2.5)})
    encoded = encode_fact(qwen, fact, "x", include_eos=False)
    first = len(qwen.tokenizer("Quell", add_special_tokens=False)["input_ids"])
    assert encoded.weights[:first] == [0.0] * first
    assert set(encoded.weights[first:]) == {2.5}
    full = capture(qwen, [FACTS[2]], 0, options=CaptureOptions(include_eos=False))
    dropped = capture(qwen, [fact], 0, options=CaptureOptions(include_eos=False))
    assert dropped.positions == full.positions - first
    assert torch.equal(dropped.keys_without, full.keys_without[first:])
    assert set(dropped.weights.tolist()) == {2.5}


def test_no_hook_remains_after_a_capture_that_raises(qwen: LoadedModel) -> None:
    before = _hooks(qwen)

    def fault(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        raise RuntimeError("injected fault")

    handle = qwen.architecture.layer_list(qwen.model)[0].register_forward_pre_hook(fault)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            capture(qwen, FACTS, 1)
        assert _hooks(qwen) == before + 1
    finally:
        handle.remove()
    assert _hooks(qwen) == before
    capture(qwen, FACTS, 1)  # and a later capture still works
    assert _hooks(qwen) == before


def test_forward_stops_at_the_captured_layer(qwen: LoadedModel) -> None:
    reached: list[int] = []
    layers = qwen.architecture.layer_list(qwen.model)
    handles = [
        layer.register_forward_pre_hook(lambda _m, _a, i=i: reached.append(i))
        for i, layer in enumerate(layers)
    ]
    try:
        capture(qwen, FACTS[:1], 1)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(reached)) == [0, 1]


def test_layer_out_of_range_is_refused(qwen: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"layer 3 is out of range: the model has layers 0..2"):
        capture(qwen, FACTS, 3)


def test_prompt_longer_than_the_context_names_fact_and_field(qwen: LoadedModel) -> None:
    long = Fact(context="Qi started Oxinnovate. " * 60, question="who founded Oxinnovate?", answer="Qi")
    with pytest.raises(
        FactError,
        match=r"facts.jsonl line 2: field 'context': prompt is \d+ tokens, the model's context is 128",
    ):
        capture(qwen, [FACTS[0], long], 1, labels=["facts.jsonl line 1", "facts.jsonl line 2"])


def test_model_without_chat_template_is_refused(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["llama"])
    loaded.tokenizer.chat_template = None
    with pytest.raises(FactError, match=r"fact 1: field 'context': .*no chat template"):
        capture(loaded, FACTS, 1)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    with_template = load_model(tiny_model_dirs["llama"], chat_template=template)
    assert capture(with_template, FACTS, 1).positions > 0


def test_non_finite_activations_name_the_fact(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    with torch.no_grad():
        loaded.model.get_parameter("model.layers.0.mlp.down_proj.weight").fill_(float("inf"))
    with pytest.raises(ValueError, match=r"who-leads: non-finite"):
        capture(loaded, [FACTS[1].model_copy(update={"id": "who-leads"})], 1)


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"question": "q?", "answer": "  ", "context": "c"}, "answer", "must not be empty"),
        ({"question": "q?", "answer": "a b", "context": "c", "significance": [1]}, "significance", "2 words"),
        ({"question": "q?", "context": "c"}, "answer", "Field required"),
    ],
)
def test_bad_facts_name_line_and_field(record: dict[str, object], field: str, reason: str) -> None:
    from qfedit.facts import parse_fact

    with pytest.raises(FactError, match=rf"facts.jsonl line 7: field '{field}': .*{reason}"):
        parse_fact(record, "facts.jsonl line 7")
