"""On a tiny random model of every supported family, a seed-rule edit makes the edited layer's
output without the context equal its output with the context, at the answer positions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FACTS

from qfedit.architectures import OutputNorm
from qfedit.capture import capture, encode_fact
from qfedit.delta import DeltaMismatchError, applied
from qfedit.edit import base_weight, make_delta, spread_delta
from qfedit.errors import InvalidInputError
from qfedit.hparams import EditConfig, SolveConfig
from qfedit.modeling import LoadedModel, load_model, weights_fingerprint

FAMILIES = ["qwen2", "llama", "mistral", "gemma", "gemma3_text", "phi3", "gpt2"]
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
    assert float((after - target).norm() / target.norm()) < _reachable(loaded, LAYER) + 1e-4
    assert float((after - target).norm()) < 0.5 * float((before - target).norm())


def _reachable(loaded: LoadedModel, layer: int) -> float:
    """How close, relative to the with-context output, the layer's output can get without the
    context: exactly (0) for `h + W k`; for `h + N(W k)` (Gemma 3) only as close as the nearest
    point of the norm's reachable shell, `N` of the `down_proj` output that the edit solves for."""
    captured = capture(loaded, FACTS, layer)
    norm = captured.output_norm
    if norm is None:
        return 0.0
    weight = base_weight(loaded, layer)
    outputs = captured.keys_without.to(torch.float64) @ weight.T
    reached = captured.residuals_without.to(torch.float64) + norm(outputs + captured.errors(weight))
    wanted = captured.residuals_with.to(torch.float64) + norm(captured.keys_with.to(torch.float64) @ weight.T)
    return float((reached - wanted).norm() / wanted.norm())


def test_the_output_norm_preimage_is_exact_on_its_shell_and_nearest_off_it() -> None:
    """Gemma 3's post-MLP RMSNorm: a target `N` can reach is met exactly; one it cannot is met by
    the shell's nearest point, nearer than any other output of the same scale."""
    generator = torch.Generator().manual_seed(0)
    d = 16
    norm = OutputNorm(gain=torch.rand(d, generator=generator, dtype=torch.float64) * 2 + 0.1, eps=1e-6)
    like = torch.randn(4, d, generator=generator, dtype=torch.float64) * 3
    on_shell = norm(torch.randn(4, d, generator=generator, dtype=torch.float64) * 3)
    torch.testing.assert_close(norm(norm.preimage(on_shell, like=like)), on_shell, rtol=1e-6, atol=1e-6)
    off = torch.randn(4, d, generator=generator, dtype=torch.float64) * 5
    nearest = (norm(norm.preimage(off, like=like)) - off).norm(dim=-1)
    others = norm(torch.randn(4000, d, generator=generator, dtype=torch.float64))
    for row in range(4):
        assert float(nearest[row]) <= float((others - off[row]).norm(dim=-1).min()) + 1e-9


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
    assert float((after - target).norm() / target.norm()) < _reachable(loaded, top) + 1e-4
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
        ValueError,
        match=r"unsupported model architecture 'gpt_neox'; supported: gemma, gemma3_text, gpt2, llama",
    ):
        load_model(tmp_path)


def _copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        shutil.copy2(file, target / file.name)
    return target


def test_pickled_weights_beside_renamed_safetensors_cannot_borrow_the_fingerprint(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The attack: the real weights renamed `junk.safetensors` (what the old fingerprint hashed)
    and a `pytorch_model.bin` with zeroed `down_proj` (what transformers then loaded)."""
    source = tiny_model_dirs["qwen2"]
    attack = _copy_model(source, tmp_path / "attack")
    (attack / "model.safetensors").rename(attack / "junk.safetensors")
    state = load_model(source).model.state_dict()
    zeroed = {k: torch.zeros_like(v) if "down_proj" in k else v for k, v in state.items()}
    torch.save(zeroed, attack / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match=r"pickled weights \(pytorch_model\.bin\)"):
        weights_fingerprint(attack)
    with pytest.raises(InvalidInputError, match=r"pytorch_model\.bin"):
        load_model(attack)
    # Without the pickle, a stray name is not what loading reads either: refused, not hashed.
    (attack / "pytorch_model.bin").unlink()
    with pytest.raises(InvalidInputError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        weights_fingerprint(attack)


@pytest.mark.parametrize(
    ("plant", "named"),
    [
        ("model.bin", "model.bin"),  # pickled weights next to the real ones: refused all the same
        ("adapter_config.json", "adapter_config.json"),  # peft would apply an adapter on load
        ("transformers_weights", "transformers_weights"),  # config.json picks another weights file
        ("index_outside", "is not a *.safetensors file in"),  # an index whose shard leaves the folder
    ],
)
def test_directories_whose_loaded_weights_differ_from_the_hashed_ones_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, plant: str, named: str
) -> None:
    model = _copy_model(tiny_model_dirs["qwen2"], tmp_path / "model")
    if plant == "transformers_weights":
        shutil.copy2(model / "model.safetensors", model / "other.safetensors")
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(
            json.dumps({**config, "transformers_weights": "other.safetensors"})
        )
    elif plant == "index_outside":
        (model / "model.safetensors").rename(tmp_path / "model.safetensors")
        index = {"weight_map": {"lm_head.weight": "../model.safetensors"}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (model / plant).write_text("{}")
    with pytest.raises(InvalidInputError, match=re.escape(named)):
        weights_fingerprint(model)


def test_fingerprint_hashes_only_the_files_loading_reads(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    source = tiny_model_dirs["qwen2"]
    model = _copy_model(source, tmp_path / "model")
    save_file({"unused": torch.ones(2)}, str(model / "notes.safetensors"))  # transformers ignores it
    assert weights_fingerprint(model) == weights_fingerprint(source) == load_model(model).fingerprint
