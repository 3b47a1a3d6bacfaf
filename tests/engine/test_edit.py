"""On a tiny random model of every supported family, a seed-rule edit makes the edited layer's
output without the context equal its output with the context, at the answer positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FACTS

from qfedit.capture import encode_fact
from qfedit.delta import DeltaMismatchError, applied
from qfedit.edit import make_delta, spread_delta
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import LoadedModel, load_model, weights_fingerprint

FAMILIES = ["qwen2", "llama", "mistral", "gemma", "phi3", "gpt2"]
LAYER = 1


def _layer_outputs(loaded: LoadedModel, with_context: bool, at: int = LAYER) -> torch.Tensor:
    """Layer `at`'s output at every answer-predicting position, fact after fact."""
    layer = loaded.architecture.layer_list(loaded.model)[at]
    rows = []
    for index, fact in enumerate(FACTS):
        encoded = encode_fact(loaded, fact, f"fact {index}")
        ids = encoded.with_context if with_context else encoded.without_context
        seen: list[torch.Tensor] = []

        def keep(_m: torch.nn.Module, _a: object, out: object, seen: list[torch.Tensor] = seen) -> None:
            seen.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type]

        handle = layer.register_forward_hook(keep)
        try:
            with torch.inference_mode():
                loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            handle.remove()
        predicted = len(encoded.weights)
        rows.append(seen[0][0, len(ids) - 1 - predicted : len(ids) - 1])
    return torch.cat(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_edit_makes_the_layer_behave_as_with_context(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    loaded = load_model(tiny_model_dirs[family])
    target = _layer_outputs(loaded, with_context=True)
    before = _layer_outputs(loaded, with_context=False)
    assert float((before - target).norm() / target.norm()) > 1e-2  # the context matters before the edit

    deltas = {}
    for form in ("dual", "primal"):
        config = EditConfig(layer=LAYER, solve=SolveConfig(rule="seed", form=form))  # type: ignore[arg-type]
        deltas[form] = make_delta(loaded, FACTS, config).delta
    name = loaded.architecture.down_proj_name(LAYER)
    dual, primal = deltas["dual"].tensors[name], deltas["primal"].tensors[name]
    assert float((dual - primal).norm() / dual.norm()) < 1e-5

    with applied(loaded, deltas["dual"]):
        after = _layer_outputs(loaded, with_context=False)
    assert float((after - target).norm() / target.norm()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_edit_over_several_layers_makes_the_top_layer_behave_as_with_context(
    tiny_model_dirs: dict[str, Path], family: str
) -> None:
    loaded = load_model(tiny_model_dirs[family])
    top = 2
    target = _layer_outputs(loaded, with_context=True, at=top)
    before = _layer_outputs(loaded, with_context=False, at=top)
    assert float((before - target).norm() / target.norm()) > 1e-2

    config = EditConfig(layers=(0, 1, 2), solve=SolveConfig(rule="seed"))
    result = make_delta(loaded, FACTS, config)
    names = [loaded.architecture.down_proj_name(layer) for layer in (0, 1, 2)]
    assert sorted(result.delta.tensors) == sorted(names)
    assert result.delta.metadata["layers"] == [0, 1, 2] and result.delta.metadata["layer"] == top
    # Every layer carries part of the edit, not the top one alone.
    for name in names:
        assert float(result.delta.tensors[name].norm()) > 0, name
    with applied(loaded, result.delta):
        after = _layer_outputs(loaded, with_context=False, at=top)
    assert float((after - target).norm() / target.norm()) < 1e-4
    # The lower layers alone close part of the error, not all of it: the top layer has its share.
    with applied(
        loaded,
        type(result.delta)(
            {k: v for k, v in result.delta.tensors.items() if k != names[-1]}, loaded.fingerprint
        ),
    ):
        lower_only = _layer_outputs(loaded, with_context=False, at=top)
    remaining = float((lower_only - target).norm() / (before - target).norm())
    assert 0.05 < remaining < 0.95


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_a_spread_reduced_run_by_run_equals_one_reduced_at_once(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """A spread holds one statistics run's observations at a time (memory bounded by the run,
    not the fact set); cut into runs of one fact it solves the edit a single run solves."""
    loaded = load_model(tiny_model_dirs["qwen2"])
    config = EditConfig(layers=(0, 1), solve=SolveConfig(rule="seed", form=form))  # type: ignore[arg-type]
    whole = spread_delta(loaded, FACTS, config, fact_set_digest="x", shard_size=len(FACTS))
    monkeypatch.setattr("qfedit.edit.STATISTICS_RUN", 1)
    pieces = spread_delta(loaded, FACTS, config, fact_set_digest="x", shard_size=2)
    assert whole.solve.form == pieces.solve.form == form
    assert sorted(whole.delta.tensors) == sorted(pieces.delta.tensors)
    for name, tensor in whole.delta.tensors.items():
        assert float(tensor.norm()) > 0, name
        torch.testing.assert_close(pieces.delta.tensors[name], tensor, rtol=1e-4, atol=1e-6)


def test_apply_then_revert_restores_every_weight_bitwise(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"], dtype="bfloat16")
    original = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    result = make_delta(loaded, FACTS, EditConfig(layer=LAYER, solve=SolveConfig(rule="seed")))
    name = loaded.architecture.down_proj_name(LAYER)
    with applied(loaded, result.delta):
        assert not torch.equal(loaded.model.get_parameter(name), original[name])
    for pname, parameter in loaded.model.named_parameters():
        assert torch.equal(parameter, original[pname]), pname
        assert parameter.dtype == torch.bfloat16


def test_delta_round_trips_and_refuses_another_base(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dirs["qwen2"])
    result = make_delta(loaded, FACTS, EditConfig(layer=LAYER, solve=SolveConfig(rule="seed")))
    path = tmp_path / "delta.safetensors"
    result.delta.save(path)
    from qfedit.delta import Delta

    back = Delta.load(path)
    assert back.base_fingerprint == loaded.fingerprint
    assert back.metadata["layer"] == LAYER and back.metadata["hparams"]["solve"]["rule"] == "seed"
    assert list(back.tensors) == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(
        back.tensors["model.layers.1.mlp.down_proj.weight"],
        result.delta.tensors["model.layers.1.mlp.down_proj.weight"],
    )

    other = load_model(tiny_model_dirs["llama"])
    with (
        pytest.raises(DeltaMismatchError, match=rf"{back.base_fingerprint}.*{other.fingerprint}"),
        applied(other, back),
    ):
        pass


def test_gpt2_delta_is_stored_in_conv1d_layout(tiny_model_dirs: dict[str, Path]) -> None:
    loaded = load_model(tiny_model_dirs["gpt2"])
    result = make_delta(loaded, FACTS, EditConfig(layer=LAYER, solve=SolveConfig(rule="seed")))
    tensor = result.delta.tensors["transformer.h.1.mlp.c_proj.weight"]
    assert (
        tuple(tensor.shape)
        == tuple(loaded.model.get_parameter("transformer.h.1.mlp.c_proj.weight").shape)
        == (128, 32)
    )


def test_fingerprint_ignores_sharding(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_model_dirs["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path) == weights_fingerprint(source)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(
        ValueError, match=r"unsupported model architecture 'gpt_neox'; supported: gemma, gpt2, llama"
    ):
        load_model(tmp_path)
