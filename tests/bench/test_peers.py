"""The MEMIT and AlphaEdit of `bench/peers/` (the side-by-side baselines of bench/real_quality.py)
on a tiny model: each writes the facts it is given, and AlphaEdit leaves the keys its
preservation text spans unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import FACTS

from qfedit.covariance import compute_covariance, transcript
from qfedit.delta import applied
from qfedit.evaluate import answer_logprobs
from qfedit.modeling import load_model

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from peers import PeerConfig, peer_delta

LAYERS = (0, 1)
CORPUS = [("who is Qi?", "a founder.")]


def test_memit_and_alphaedit_write_the_facts_and_alphaedit_spares_the_preserved_keys(
    tiny_model_dirs: dict[str, Path],
) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    texts = [transcript(loaded, q, a) for q, a in CORPUS]
    covariances = {layer: compute_covariance(loaded, texts, layer, positions="all")[0] for layer in LAYERS}
    questions, answers = [f.question for f in FACTS], [f.answer for f in FACTS]
    before = answer_logprobs(loaded, questions, answers)
    kept = {}
    for method in ("memit", "alphaedit"):  # MEMIT weighs the preserved keys, AlphaEdit spares them
        delta, seconds = peer_delta(loaded, FACTS, PeerConfig(method, LAYERS, lam=1.0), covariances)  # type: ignore[arg-type]
        assert seconds > 0 and sorted(delta.tensors) == sorted(
            loaded.architecture.down_proj_name(layer) for layer in LAYERS
        )
        with applied(loaded, delta):
            after = answer_logprobs(loaded, questions, answers)
        # AlphaEdit writes only in what the preservation keys leave free: less, on a tiny model.
        assert sum(after) > sum(before) + (1.0 if method == "memit" else 0.3), (method, before, after)
        # The change on the directions the preservation keys span, relative to its size.
        name = loaded.architecture.down_proj_name(LAYERS[0])
        change = delta.tensors[name].to(torch.float64)
        values, vectors = torch.linalg.eigh(covariances[LAYERS[0]].to(torch.float64))
        spanned = vectors[:, values >= PeerConfig(method, LAYERS).null_threshold * values.max()]
        assert spanned.shape[1] > 0
        kept[method] = float((change @ spanned).norm() / change.norm())
    assert kept["alphaedit"] < 1e-6
