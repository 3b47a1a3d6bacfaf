"""The preservation covariance `C = E[k k^T]` of a layer's keys over a text corpus.

Streamed: texts are tokenised and run in batches up to the layer, keys at every real position are
folded into a float64 `m x m` sum, and nothing else is kept, so memory stays `O(m^2 + batch)`.
Cached on disk by (base fingerprint, layer, corpus digest, sample count): computed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file

from qfedit.capture import LayerTrace, pad_batch, run_until_layer
from qfedit.facts import Fact
from qfedit.modeling import LoadedModel

log = logging.getLogger(__name__)


def corpus_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def transcript(loaded: LoadedModel, question: str, answer: str) -> str:
    """A question and its answer in the chat template, without context: what the model says now."""
    from qfedit.capture import chat_prompt

    return chat_prompt(loaded.tokenizer, question) + answer + (loaded.tokenizer.eos_token or "")


def fact_texts(loaded: LoadedModel, facts: Iterable[Fact]) -> list[str]:
    """Chat transcripts (question and answer, no context) of facts the edit should leave alone."""
    return [transcript(loaded, fact.question, fact.answer) for fact in facts]


def corpus_texts(loaded: LoadedModel, paths: Sequence[Path]) -> list[str]:
    """A preservation corpus from files: JSONL records with `question` and `answer` become chat
    transcripts (any other field is ignored), any other file gives one text per non-empty line."""
    texts: list[str] = []
    for path in paths:
        if path.suffix != ".jsonl":
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                for field in ("question", "answer"):
                    if not isinstance(record.get(field), str):
                        raise ValueError(f"{path.name} line {number}: field {field!r}: a string is required")
                texts.append(transcript(loaded, record["question"], record["answer"]))
    return texts


def _cache_path(cache_dir: Path, loaded: LoadedModel, layer: int, digest: str, samples: int) -> Path:
    key = hashlib.sha256(f"{loaded.fingerprint}|{layer}|{digest}|{samples}".encode()).hexdigest()[:32]
    return cache_dir / f"covariance-{key}.safetensors"


def compute_covariance(
    loaded: LoadedModel,
    texts: Sequence[str],
    layer: int,
    *,
    samples: int = 20_000,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """`(C, positions)`: the mean `k k^T` over up to `samples` key positions of `texts` at `layer`."""
    if not texts:
        raise ValueError("the preservation corpus is empty")
    loaded.architecture.check_layer(loaded.model, layer)
    digest = corpus_digest(texts)
    cached = _cache_path(cache_dir, loaded, layer, digest, samples) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with safe_open(str(cached), framework="pt") as handle:
            return handle.get_tensor("C"), int((handle.metadata() or {})["positions"])

    tokenizer = loaded.tokenizer
    total: torch.Tensor | None = None
    seen = 0
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"covariance at layer {layer}", total=samples)
        for start in range(0, len(texts), batch_size):
            if seen >= samples:
                break
            ids_list = [
                tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start : start + batch_size]
            ]
            limit = loaded.max_positions
            ids_list = [ids[:limit] if limit else ids for ids in ids_list if ids]
            if not ids_list:
                continue
            ids, mask, positions, _ = pad_batch(ids_list, tokenizer.pad_token_id, "right", loaded.device)
            with LayerTrace(loaded, layer, residuals=False) as trace:
                run_until_layer(loaded.model, ids, mask, positions)
            assert trace.keys is not None
            keys = trace.keys[mask.bool()].to(torch.float64)[: samples - seen]  # (positions, m)
            total = keys.T @ keys if total is None else total + keys.T @ keys
            seen += int(keys.shape[0])
            progress.update(task, completed=seen)
    if total is None or seen == 0:
        raise ValueError("the preservation corpus produced no key positions")
    covariance = (total / seen).cpu()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp")
        save_file(
            {"C": covariance.contiguous()},
            str(partial),
            metadata={"positions": str(seen), "layer": str(layer)},
        )
        partial.replace(cached)
    log.info("preservation covariance at layer %d from %d positions", layer, seen)
    return covariance, seen
