"""Loading a local Hugging Face causal LM, and the fingerprint that names its weights."""

from __future__ import annotations

import hashlib
import json
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


# What transformers reads from a local directory when `use_safetensors=True` (and nothing else).
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# Weights that would be unpickled, or loaded in place of (or on top of) the safetensors that the
# fingerprint covers: a directory holding any of them is refused, not fingerprinted around.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_CONFIG = "adapter_config.json"  # with peft installed, transformers applies the adapter


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files loading reads: `model.safetensors`, or else the shards its index names.

    This is transformers' own choice with `use_safetensors=True` (`load_model` passes it), so the
    fingerprint covers exactly the loaded weights. A directory with anything that could change
    that choice or add to the weights (pickled weights, a PEFT adapter, a `transformers_weights`
    entry in config.json) is refused, naming the file.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InvalidInputError(f"{model_dir}: not a model directory")
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in PICKLED_WEIGHTS)
    if pickled:
        raise InvalidInputError(
            f"{model_dir}: holds pickled weights ({', '.join(pickled)}); only safetensors are loaded, "
            "so remove them (or convert them to model.safetensors)"
        )
    if (model_dir / ADAPTER_CONFIG).exists():
        raise InvalidInputError(
            f"{model_dir}: holds {ADAPTER_CONFIG}, an adapter that loading would apply on top of the "
            "base weights; merge it into the weights or remove it"
        )
    config = model_dir / "config.json"
    if config.is_file() and "transformers_weights" in _json_object(config):
        raise InvalidInputError(
            f"{config}: names its own weights file (transformers_weights); remove that entry so "
            f"{SAFE_WEIGHTS} (or {SAFE_WEIGHTS_INDEX}) is what loads"
        )
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [model_dir / SAFE_WEIGHTS]
    index = model_dir / SAFE_WEIGHTS_INDEX
    if not index.is_file():
        raise InvalidInputError(f"{model_dir}: no {SAFE_WEIGHTS} or {SAFE_WEIGHTS_INDEX} found")
    weight_map = _json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInputError(f"{index}: has no weight_map naming its shards")
    shards = []
    for name in sorted(set(weight_map.values())):
        # A shard is a file beside the index: no folders, nothing that leaves the directory.
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise InvalidInputError(f"{index}: shard {name!r} is not a *.safetensors file in {model_dir}")
        if not (model_dir / name).is_file():
            raise InvalidInputError(f"{index}: shard {name} is missing")
        shards.append(model_dir / name)
    return shards


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidInputError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{path}: not a JSON object")
    return value


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the sorted tensor names, dtypes, shapes and bytes of the weights loading reads.

    Independent of how the weights are sharded across files, so a re-sharded copy of the same
    weights has the same fingerprint. `weight_files` says which files those are.
    """
    where: dict[str, Path] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in where:
                    raise InvalidInputError(
                        f"{model_dir}: tensor {name} is in both {where[name].name} and {file.name}"
                    )
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
    # Before loading: it refuses a directory whose weights loading would not take from the
    # files it hashes (and `use_safetensors` keeps transformers to those files).
    fingerprint = weights_fingerprint(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, device_map=device_map, local_files_only=True, use_safetensors=True
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
        fingerprint=fingerprint,
        path=path,
    )
