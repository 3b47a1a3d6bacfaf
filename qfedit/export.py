"""Export a version: a full model directory with the delta merged, or a PEFT LoRA adapter.

    export_full(base_dir, delta, out_dir)           # transformers / vLLM load it as any model
    report = export_lora(base_dir, delta, architecture, out_dir, max_rank=64)
    report.relative_error                           # 0 (to float32 rounding) when the rank fits

The full export copies the base directory (config, tokenizer, generation config, chat template)
and rewrites only the safetensors shards that hold an edited tensor, each merged in the shard's
own dtype with the same arithmetic as `AppliedDelta` (`round(float32(W) + dW)`), so loading the
export in the file's dtype gives exactly the weights the library serves. The shard layout and
index stay the same.

The LoRA export factors each edited `down_proj` update `dW (d x m) = B A`, from its SVD, with
`r` = the update's numerical rank capped by `max_rank`; when the cap cuts it the truncation's
relative Frobenius error is measured, reported, and written next to the adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qfedit.architectures import Architecture
from qfedit.delta import Delta, merged
from qfedit.errors import InvalidInputError
from qfedit.modeling import weight_files

log = logging.getLogger(__name__)

# Pickled or foreign-framework weights are not copied: they would hold the unedited tensors,
# and a loader that prefers them would silently serve the base model.
_SKIPPED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
EXPORT_INFO = "qfedit_export.json"
LORA_INFO = "qfedit_lora.json"


class ExportError(InvalidInputError):
    """An export that cannot be made as asked (existing output, missing tensor, nothing to export)."""


def _prepare_output(out_dir: Path) -> Path:
    """A fresh `<out>.partial` folder; renamed to `out_dir` only once complete."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists and is not empty; choose another output directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        # Never emptied or reused: it may be someone's files, or another export still running.
        partial.mkdir(parents=True)
    except FileExistsError:
        raise ExportError(
            f"{partial}: already exists (an interrupted or running export, or other files); "
            "remove it yourself or choose another output directory"
        ) from None
    return partial


def _finish(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # checked empty above
    os.replace(partial, out_dir)


def _shard_keys(base_dir: Path) -> dict[str, Path]:
    where: dict[str, Path] = {}
    for file in weight_files(base_dir):  # the files loading reads, as the fingerprint hashes
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[key] = file
    if not where:
        raise ExportError(f"{base_dir}: no *.safetensors weights to export from")
    return where


def _file_key(parameter: str, keys: dict[str, Path]) -> str:
    """The key a parameter is stored under; older checkpoints drop the top prefix (`transformer.`)."""
    if parameter in keys:
        return parameter
    _prefix, _, rest = parameter.partition(".")
    if rest in keys:
        return rest
    raise ExportError(f"the delta changes {parameter!r}, which no safetensors file of the base model holds")


def export_full(
    base_dir: Path, delta: Delta | None, out_dir: Path, *, info: dict[str, Any] | None = None
) -> Path:
    """Write a model directory: the base's files, with `delta` merged into its weights.

    `delta=None` (version 0) exports the base itself. The caller checks that `base_dir` holds
    the weights the delta was made for (their fingerprint), as the CLI does.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    keys = _shard_keys(base_dir)
    changes = {} if delta is None else {_file_key(name, keys): t for name, t in delta.tensors.items()}
    partial = _prepare_output(out_dir)
    try:
        record = {"format": "full", "base": str(base_dir), "changed_tensors": sorted(changes), **(info or {})}
        (partial / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n")
        for source in sorted(base_dir.iterdir()):
            if not source.is_file() or source.name.startswith(".") or source.suffix in _SKIPPED_WEIGHTS:
                continue
            if source.name == EXPORT_INFO:
                continue  # a base that is itself an export: this export's record replaces its
            target = partial / source.name
            edited = [key for key, file in keys.items() if file == source and key in changes]
            if source.suffix == ".safetensors" and edited:
                tensors, metadata = _merged_shard(source, {key: changes[key] for key in edited})
                _save_weights(tensors, target, metadata, like=partial / EXPORT_INFO)
            else:
                shutil.copy2(source, target)
        _finish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("exported %s full model to %s (%d tensors merged)", info or "", out_dir, len(changes))
    return out_dir


def _save_weights(
    tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str], *, like: Path
) -> None:
    """Write `tensors` as safetensors with the mode of `like`, a file the export wrote as files are
    written here (the umask's): safetensors writes through a private (0600) temporary file, which
    left the weights unlike the export's other files."""
    save_file(tensors, str(target), metadata=metadata)
    shutil.copymode(like, target)


def _merged_shard(
    source: Path, changes: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shard's tensors, the changed ones merged, and its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            change = changes.get(key)
            if change is not None:
                if tuple(change.shape) != tuple(tensor.shape):
                    raise ExportError(
                        f"{key}: the delta is {tuple(change.shape)}, the stored weight is {tuple(tensor.shape)}"
                    )
                tensor = merged(tensor, change)
            tensors[key] = tensor
    return tensors, metadata


# -- LoRA -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleFactor:
    module: str
    numerical_rank: int
    rank: int
    relative_error: float
    """|dW - B A|_F / |dW|_F for this module."""


@dataclass(frozen=True)
class LoraReport:
    rank: int
    """The adapter's `r` (modules of lower rank are padded with zero rows, which add nothing)."""
    exact: bool
    """True when every module kept its full numerical rank."""
    relative_error: float
    """Over all edited modules together: |dW - BA|_F / |dW|_F."""
    modules: tuple[ModuleFactor, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modules": [asdict(m) for m in self.modules]}


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank at float32 resolution: deltas are stored in float32, so smaller directions are rounding."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tolerance).sum())


def lora_factors(
    delta: Delta, architecture: Architecture, max_rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], LoraReport]:
    """`{module: (A (r x m), B (d x r))}` with `B A ~= dW` in the `(out, in)` layout, and the report."""
    if max_rank < 1:
        raise InvalidInputError(f"rank must be >= 1, not {max_rank}")
    suffix = ".weight"
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: list[ModuleFactor] = []
    total_sq = residual_sq = 0.0
    for name in sorted(delta.tensors):
        if not name.endswith(suffix):
            raise ExportError(f"the delta changes {name!r}, which is not a module weight a LoRA can carry")
        change = delta.tensors[name].to(torch.float64)
        # LoRA computes x A^T B^T, i.e. a Linear of weight B A in (out, in) layout; GPT-2's Conv1D
        # stores its weight (in, out), so its delta is transposed first (PEFT: fan_in_fan_out).
        update = change.T if architecture.transposed else change  # (d, m)
        u, s, vh = torch.linalg.svd(update, full_matrices=False)  # (d, k), (k,), (k, m)
        full = numerical_rank(s, (update.shape[0], update.shape[1]))
        rank = min(full, max_rank)
        root = s[:rank].sqrt()
        b = u[:, :rank] * root  # (d, r)
        a = root[:, None] * vh[:rank]  # (r, m)
        dropped = float(s[rank:].pow(2).sum())
        kept_total = float(s.pow(2).sum())
        total_sq += kept_total
        residual_sq += dropped
        factors[name[: -len(suffix)]] = (a, b)
        modules.append(
            ModuleFactor(
                module=name[: -len(suffix)],
                numerical_rank=full,
                rank=rank,
                relative_error=math.sqrt(dropped / kept_total) if kept_total else 0.0,
            )
        )
    if not factors:
        raise ExportError("the delta changes no weights; there is nothing to export as a LoRA adapter")
    r = max(max(m.rank for m in modules), 1)
    report = LoraReport(
        rank=r,
        exact=all(m.rank == m.numerical_rank for m in modules),
        relative_error=math.sqrt(residual_sq / total_sq) if total_sq else 0.0,
        modules=tuple(modules),
    )
    return factors, report


def export_lora(
    base_dir: Path,
    delta: Delta,
    architecture: Architecture,
    out_dir: Path,
    *,
    max_rank: int = 64,
    info: dict[str, Any] | None = None,
) -> LoraReport:
    """Write a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) for the delta.

    `lora_alpha = r`, so PEFT's scaling `alpha / r` is 1 and `B A` is the update itself.
    Adapter weights are float32 (PEFT up-casts adapters to float32 by default anyway).
    """
    from peft import LoraConfig

    factors, report = lora_factors(delta, architecture, max_rank)
    r = report.rank
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        padded_a = torch.zeros(r, a.shape[1], dtype=torch.float64)
        padded_b = torch.zeros(b.shape[0], r, dtype=torch.float64)
        padded_a[: a.shape[0]] = a
        padded_b[:, : b.shape[1]] = b
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = padded_a.to(torch.float32).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = padded_b.to(torch.float32).contiguous()
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        # Full module names: exactly the edited projections, none of the other layers' ones.
        target_modules=sorted(factors),
        fan_in_fan_out=architecture.transposed,
        base_model_name_or_path=str(base_dir),
        inference_mode=True,
    )
    out_dir = Path(out_dir)
    partial = _prepare_output(out_dir)
    try:
        config.save_pretrained(str(partial))
        weights = partial / "adapter_model.safetensors"
        _save_weights(tensors, weights, {"format": "pt"}, like=partial / "adapter_config.json")
        record = {"format": "lora", "base": str(base_dir), **(info or {}), **report.as_dict()}
        (partial / LORA_INFO).write_text(json.dumps(record, indent=2) + "\n")
        (partial / "README.md").write_text(_lora_readme(report, info or {}))
        _finish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("exported LoRA r=%d to %s (relative error %.3g)", r, out_dir, report.relative_error)
    return report


def model_type(base_dir: Path) -> str:
    """The `model_type` of a model directory's config.json (which architecture row applies)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    value = config.get("model_type")
    if not isinstance(value, str):
        raise ExportError(f"{base_dir}/config.json has no model_type")
    return value


def _lora_readme(report: LoraReport, info: dict[str, Any]) -> str:
    title = info.get("version", "a qfedit version")
    lines = [
        f"# LoRA adapter of {title}",
        "",
        "Made by `qfedit export --format lora` from the version's `down_proj` update (closed-form fact edit).",
        f"Base model: {info.get('base_model', 'see adapter_config.json')}.",
        "",
        f"- r = {report.rank}, lora_alpha = {report.rank} (scaling 1)",
        f"- {'exact: every update fits in r' if report.exact else 'TRUNCATED: the update rank exceeds r'}",
        f"- relative Frobenius error |dW - BA| / |dW| = {report.relative_error:.3e}",
        "",
        "| module | numerical rank | kept rank | relative error |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {m.module} | {m.numerical_rank} | {m.rank} | {m.relative_error:.3e} |" for m in report.modules
    ]
    return "\n".join(lines) + "\n"
