"""Loading a local Hugging Face causal LM, and the fingerprint that names its weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qfedit.architectures import Architecture, architecture_for
from qfedit.errors import InvalidInputError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}") from None


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the sorted tensor names, dtypes, shapes and bytes of a directory's safetensors.

    Independent of how the weights are sharded across files, so a re-sharded copy of the same
    weights has the same fingerprint.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InvalidInputError(
            f"{model_dir}: no *.safetensors weights found (pickled weights are not loaded)"
        )
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[name] = file
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A base model ready for capture and editing: weights, tokenizer, and where QF edits it."""

    model: nn.Module
    tokenizer: Any
    architecture: Architecture
    fingerprint: str
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers(self.model)

    @property
    def max_positions(self) -> int | None:
        config = self.model.config  # type: ignore[union-attr]
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None


def load_model(
    model_dir: Path | str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> LoadedModel:
    """Load a local model directory; the same path serves the demo model, Qwen2.5 and Llama.

    `device_map` (e.g. "auto") places the model with accelerate instead of moving it to `device`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{path}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    architecture = architecture_for(config.model_type)
    torch_dtype = resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, device_map=device_map, local_files_only=True
    )
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]  # transformers types `to` loosely
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any id will do, the end-of-text one is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "loaded %s (%s, %s layers) from %s",
        config.model_type,
        torch_dtype,
        architecture.num_layers(model),
        path,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        architecture=architecture,
        fingerprint=weights_fingerprint(path),
        path=path,
    )
