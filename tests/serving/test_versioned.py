"""VersionedModel: switching versions writes base + delta exactly, only where needed, under a lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from qfedit.delta import Delta, DeltaMismatchError, applied
from qfedit.modeling import LoadedModel, load_model
from qfedit.serving import VersionedModel


def _weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def _assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_any_path_of_switches_gives_base_plus_delta_bitwise(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], family: str, dtype: str
) -> None:
    a, b = deltas[family]["a"], deltas[family]["b"]
    reference = load_model(tiny_model_dirs[family], dtype=dtype)
    base = _weights(reference)
    expected = {}
    for label, delta in (("a", a), ("b", b)):
        with applied(reference, delta):
            expected[label] = _weights(reference)

    versioned = VersionedModel(load_model(tiny_model_dirs[family], dtype=dtype), base_label="tiny@0")
    path = [("a", a), ("b", b), ("a", a), ("b", b), ("base", None), ("b", b), ("a", a)]
    for label, delta in path:
        versioned.switch_to(delta, label)
        assert versioned.version == label
        _assert_bitwise(_weights(versioned.loaded), base if delta is None else expected[label])
    # A version differs from the base only in its own tensors.
    changed = {n for n in base if not torch.equal(expected["b"][n], base[n])}
    assert changed == set(b.tensors)


def test_a_switch_writes_only_the_tensors_that_differ(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    b = deltas["qwen2"]["b"]
    layer1, layer2 = sorted(b.tensors)
    only_layer1 = Delta({layer1: b.tensors[layer1]}, b.base_fingerprint)
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]))
    assert versioned.switch_to(only_layer1, "v1").written == (layer1,)
    report = versioned.switch_to(b, "v2")
    assert (report.written, report.unchanged) == ((layer2,), (layer1,))
    report = versioned.switch_to(only_layer1, "v1")
    assert (report.written, report.unchanged) == ((layer2,), (layer1,))
    assert versioned.switch_to(None).written == (layer1,)
    assert versioned.version == "base"


def test_a_bad_delta_leaves_the_served_version_untouched(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    a = deltas["qwen2"]["a"]
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]))
    versioned.switch_to(a, "a")
    before = _weights(versioned.loaded)
    name = next(iter(a.tensors))
    bad_shape = Delta(
        {name: a.tensors[name], "model.layers.2.mlp.down_proj.weight": torch.ones(3, 3)}, a.base_fingerprint
    )
    with pytest.raises(DeltaMismatchError, match=r"model.layers.2.mlp.down_proj.weight.*\(3, 3\)"):
        versioned.switch_to(bad_shape, "bad")
    other_base = Delta(dict(a.tensors), "0" * 64)
    with pytest.raises(DeltaMismatchError, match="0000"):
        versioned.switch_to(other_base, "bad")
    assert versioned.version == "a"
    _assert_bitwise(_weights(versioned.loaded), before)


def test_versions_are_merged_not_hooked(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]))
    versioned.switch_to(deltas["qwen2"]["b"], "b")
    for module in versioned.loaded.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_concurrent_readers_never_see_a_half_applied_version(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    """Readers compute logits while a writer keeps switching; each result is exactly its label's."""
    versions = {"base": None, "a": deltas["qwen2"]["a"], "b": deltas["qwen2"]["b"]}
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]))
    ids = torch.arange(3, 40).unsqueeze(0)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return versioned.loaded.model(input_ids=ids).logits  # type: ignore[operator]

    expected = {}
    for label, delta in versions.items():
        versioned.switch_to(delta, label)
        expected[label] = logits()
    assert not torch.allclose(expected["a"], expected["b"], atol=1e-3)

    seen: list[tuple[str, torch.Tensor]] = []
    stop = time.monotonic() + 1.0
    failures: list[BaseException] = []

    def read() -> None:
        try:
            while time.monotonic() < stop:
                with versioned.reading() as label:
                    seen.append((label, logits()))
        except BaseException as err:  # surfaced below; a thread's exception is otherwise lost
            failures.append(err)

    def write() -> None:
        try:
            order = ["a", "b", "base", "b", "a"]
            i = 0
            while time.monotonic() < stop:
                label = order[i % len(order)]
                versioned.switch_to(versions[label], label)
                i += 1
                # Switches are rare in service; a writer that never pauses would starve readers.
                time.sleep(0.005)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert {label for label, _ in seen} == set(versions)
    for label, result in seen:
        torch.testing.assert_close(result, expected[label], rtol=0, atol=1e-5)


def test_answers_report_the_version_that_produced_them(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]]
) -> None:
    versioned = VersionedModel(load_model(tiny_model_dirs["qwen2"]), base_label="tiny@0")
    assert versioned.answer("who founded Oxinnovate?", max_new_tokens=3).version == "tiny@0"
    versioned.switch_to(deltas["qwen2"]["a"], "tiny@1")
    texts, label = versioned.answer_batch(["who founded Oxinnovate?"], max_new_tokens=3)
    assert label == "tiny@1" and len(texts) == 1


def test_delta_from_bytes_reads_delta_files_and_refuses_bare_tensor_files(
    deltas: dict[str, dict[str, Delta]], tmp_path: Path
) -> None:
    a = deltas["qwen2"]["a"]
    a.save(tmp_path / "a.safetensors")
    for back in (Delta.from_bytes(a.to_bytes()), Delta.load(tmp_path / "a.safetensors")):
        assert back.base_fingerprint == a.base_fingerprint and back.metadata["layer"] == 1
        assert back.tensors.keys() == a.tensors.keys()
        assert all(torch.equal(back.tensors[n], t) for n, t in a.tensors.items())

    bare = save({n: t.contiguous() for n, t in a.tensors.items()})
    with pytest.raises(ValueError, match="v9: not a qfedit delta"):
        Delta.from_bytes(bare, "v9")
    (tmp_path / "bare.safetensors").write_bytes(bare)
    with pytest.raises(ValueError, match=r"bare\.safetensors: not a qfedit delta"):
        Delta.load(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Delta.from_bytes(a.to_bytes()[:100])
