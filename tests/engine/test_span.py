"""The target span: QF's error restricted to the logit gaps of each position's rival tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FACTS

from qfedit.capture import answer_logits, encode_fact
from qfedit.delta import applied
from qfedit.edit import make_delta
from qfedit.hparams import EditConfig
from qfedit.modeling import LoadedModel, load_model
from qfedit.span import _gain, _unembedding, project, rivals

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
