"""Exports load with transformers (and peft) and give the logits of the library's applied version."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qfedit.architectures import architecture_for
from qfedit.delta import Delta
from qfedit.export import EXPORT_INFO, LORA_INFO, ExportError, export_full, export_lora, lora_factors
from qfedit.modeling import load_model
from qfedit.serving import VersionedModel

IDS = torch.arange(3, 43).unsqueeze(0)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits.float()  # type: ignore[operator]


def _served(model_dir: Path, delta: Delta | None, dtype: str) -> VersionedModel:
    versioned = VersionedModel(load_model(model_dir, dtype=dtype))
    versioned.switch_to(delta, "v")
    return versioned


@pytest.fixture(scope="module")
def bf16_qwen2(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 stored in bfloat16, to check the export keeps the base dtype."""
    out = tmp_path_factory.mktemp("bf16") / "qwen2"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((tiny_model_dirs["qwen2"] / name).read_bytes())
    return out


@pytest.mark.parametrize(
    ("family", "dtype"), [("qwen2", "float32"), ("gpt2", "float32"), ("qwen2", "bfloat16")]
)
def test_full_export_loads_with_the_served_weights_and_logits(
    tiny_model_dirs: dict[str, Path],
    bf16_qwen2: Path,
    deltas: dict[str, dict[str, Delta]],
    tmp_path: Path,
    family: str,
    dtype: str,
) -> None:
    base = bf16_qwen2 if dtype == "bfloat16" else tiny_model_dirs[family]
    delta = deltas[family]["b"]
    if dtype == "bfloat16":  # another base (its weights rounded); the same update, named for it
        delta = Delta(delta.tensors, load_model(base).fingerprint)
    out = export_full(base, delta, tmp_path / "export", info={"version": "tiny@2"})
    # The merged shard gets the permissions of a new file, as the export's own record does (it is
    # written through a private temporary file).
    merged, written = (out / "model.safetensors").stat(), (out / EXPORT_INFO).stat()
    assert stat.S_IMODE(merged.st_mode) == stat.S_IMODE(written.st_mode)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        EXPORT_INFO,
    ):
        assert (out / name).is_file(), name
    assert not (tmp_path / "export.partial").exists()

    exported = AutoModelForCausalLM.from_pretrained(out)  # its own dtype, as vLLM would read it
    served = _served(base, delta, dtype)
    weights = dict(exported.named_parameters())
    for name, parameter in served.loaded.model.named_parameters():
        assert weights[name].dtype == parameter.dtype == getattr(torch, dtype), name
        assert torch.equal(weights[name], parameter), name
    torch.testing.assert_close(_logits(exported), _logits(served.loaded.model), rtol=0, atol=1e-6)
    # and the tokenizer came along
    assert (
        load_model(out).tokenizer("Qi started")["input_ids"]
        == served.loaded.tokenizer("Qi started")["input_ids"]
    )


def test_full_export_of_version_0_is_the_base(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_model_dirs["qwen2"]
    out = export_full(base, None, tmp_path / "v0")
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_export_refuses_a_non_empty_output(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_full(tiny_model_dirs["qwen2"], deltas["qwen2"]["a"], tmp_path / "taken")
    stray = Delta({"model.layers.9.mlp.down_proj.weight": torch.ones(1)}, "f" * 64)
    with pytest.raises(ExportError, match=r"model.layers.9.mlp.down_proj.weight"):
        export_full(tiny_model_dirs["qwen2"], stray, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_refuses_a_pre_existing_partial_folder_and_leaves_its_files(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], tmp_path: Path
) -> None:
    """The attack: `<out>.partial` already holds someone's files; the export deleted them all."""
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "precious.txt").write_text("not the export's")
    base, delta = tiny_model_dirs["qwen2"], deltas["qwen2"]["a"]
    with pytest.raises(ExportError, match=re.escape(f"{partial}: already exists")):
        export_full(base, delta, tmp_path / "out")
    with pytest.raises(ExportError, match=re.escape(f"{partial}: already exists")):
        export_lora(base, delta, architecture_for("qwen2"), tmp_path / "out")
    assert (partial / "precious.txt").read_text() == "not the export's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]


def _peft(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_lora_export_is_exact_when_the_rank_fits(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], tmp_path: Path, family: str
) -> None:
    base, delta = tiny_model_dirs[family], deltas[family]["b"]
    architecture = load_model(base).architecture
    report = export_lora(
        base, delta, architecture, tmp_path / "lora", max_rank=64, info={"version": "tiny@2"}
    )
    assert report.exact and report.relative_error < 1e-6
    # The two layers' updates have their own ranks; the lower one is zero-padded to r.
    assert report.rank == max(m.numerical_rank for m in report.modules) < 32
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", LORA_INFO):
        assert (tmp_path / "lora" / name).is_file(), name

    adapted = _peft(base, tmp_path / "lora")
    served = _served(base, delta, "float32")
    reference, base_logits = _logits(served.loaded.model), None
    served.switch_to(None)
    base_logits = _logits(served.loaded.model)
    got = _logits(adapted)
    assert float((reference - base_logits).abs().max()) > 1e-2  # the edit moves the logits
    torch.testing.assert_close(got, reference, rtol=0, atol=2e-5)


def test_truncated_lora_reports_the_error_it_makes(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], tmp_path: Path
) -> None:
    base, delta = tiny_model_dirs["gpt2"], deltas["gpt2"]["b"]
    architecture = load_model(base).architecture
    report = export_lora(base, delta, architecture, tmp_path / "lora", max_rank=1)
    assert not report.exact and report.rank == 1 and report.relative_error > 1e-2
    assert f"{report.relative_error:.3e}" in (tmp_path / "lora" / "README.md").read_text()

    # What PEFT actually adds, read back from the loaded adapter by merging it.
    merged = _peft(base, tmp_path / "lora").merge_and_unload()
    original = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    residual = total = 0.0
    for name, change in delta.tensors.items():
        effective = merged.get_parameter(name).detach() - original[name].detach()
        residual += float((change - effective).pow(2).sum())
        total += float(change.pow(2).sum())
    assert (residual / total) ** 0.5 == pytest.approx(report.relative_error, rel=1e-3)


def test_lora_factors_refuse_what_a_lora_cannot_carry(deltas: dict[str, dict[str, Delta]]) -> None:
    from qfedit.architectures import ARCHITECTURES

    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora_factors(deltas["qwen2"]["a"], ARCHITECTURES["qwen2"], 0)
    with pytest.raises(ExportError, match="no weights"):
        lora_factors(Delta({}, "f" * 64), ARCHITECTURES["qwen2"], 4)
    with pytest.raises(ExportError, match=r"model\.norm\.bias"):
        lora_factors(Delta({"model.norm.bias": torch.ones(3)}, "f" * 64), ARCHITECTURES["qwen2"], 4)


def test_every_exported_file_gets_the_mode_a_new_file_gets_under_the_umask(
    tiny_model_dirs: dict[str, Path], deltas: dict[str, dict[str, Delta]], tmp_path: Path
) -> None:
    # The attack: the LoRA adapter's weights came out 0600 (safetensors' private temporary file)
    # where the rest of the export was 0644: a serving user that reads the adapter config could
    # not read the weights.
    import os

    base, delta = tiny_model_dirs["qwen2"], deltas["qwen2"]["a"]
    previous = os.umask(0o022)
    try:
        export_lora(base, delta, architecture_for("qwen2"), tmp_path / "lora")
        export_full(base, delta, tmp_path / "full")
    finally:
        os.umask(previous)
    # What the export writes itself (the full export copies the base's other files as they are).
    written = [
        *(tmp_path / "lora").iterdir(),
        tmp_path / "full" / EXPORT_INFO,
        tmp_path / "full" / "model.safetensors",
    ]
    modes = {f"{p.parent.name}/{p.name}": stat.S_IMODE(p.stat().st_mode) for p in written}
    assert "lora/adapter_model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o644), modes
