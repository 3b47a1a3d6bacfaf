"""The preservation covariance `C = E[k k^T]` of a layer's keys over a text corpus.

Streamed: texts are tokenised and run in batches up to the layer, keys at the kept positions are
folded into a float64 `m x m` sum, and nothing else is kept, so memory stays `O(m^2 + batch)`.
Cached on disk by (base fingerprint, layer, corpus digest, sample count): computed once.

Which positions: a chat transcript's answer positions by default (from the one that predicts the
answer's first token), text lines whole. An edit changes what the model says through the keys at
the positions that predict answers; the template and question positions outnumber them several
times and, kept, dilute the protection (`bench/quality.py --positions` measures both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qfedit.atomic import atomic_path
from qfedit.capture import LayerTrace, pad_batch, run_until_layer
from qfedit.errors import InvalidInputError
from qfedit.hparams import EditConfig, PreservePositions
from qfedit.modeling import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusText:
    """A text of the preservation corpus; its answer starts at character `answer_at` (0: no prompt)."""

    text: str
    answer_at: int = 0


def corpus_digest(texts: Sequence[CorpusText], positions: PreservePositions = "answer") -> str:
    digest = hashlib.sha256(positions.encode())
    for item in texts:
        digest.update(hashlib.sha256(f"{item.answer_at}:{item.text}".encode()).digest())
    return digest.hexdigest()


def transcript(loaded: LoadedModel, question: str, answer: str) -> CorpusText:
    """A question and its answer in the chat template, without context: what the model says now."""
    from qfedit.capture import chat_prompt

    prompt = chat_prompt(loaded.tokenizer, question)
    return CorpusText(prompt + answer + (loaded.tokenizer.eos_token or ""), answer_at=len(prompt))


def corpus_texts(
    loaded: LoadedModel, paths: Sequence[Path], *, leave_out: Callable[[str, str], bool] | None = None
) -> list[CorpusText]:
    """A preservation corpus from files: JSONL records with `question` and `answer` become chat
    transcripts (any other field is ignored; those `leave_out(question, answer)` names are left
    out), any other file gives one text per non-empty line."""
    texts: list[CorpusText] = []
    for path in paths:
        if path.suffix != ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            texts += [CorpusText(line) for line in lines if line.strip()]
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                for field in ("question", "answer"):
                    if not isinstance(record.get(field), str):
                        raise InvalidInputError(
                            f"{path.name} line {number}: field {field!r}: a string is required"
                        )
                if leave_out is not None and leave_out(record["question"], record["answer"]):
                    continue
                texts.append(transcript(loaded, record["question"], record["answer"]))
    return texts


def _cache_path(cache_dir: Path, loaded: LoadedModel, layer: int, digest: str, samples: int) -> Path:
    key = hashlib.sha256(f"{loaded.fingerprint}|{layer}|{digest}|{samples}".encode()).hexdigest()[:32]
    return cache_dir / f"covariance-{key}.safetensors"


def _first_kept(tokenizer: object, item: CorpusText, positions: PreservePositions) -> int:
    """Index of the first kept key position: the one that predicts the answer's first token."""
    if positions == "all" or item.answer_at == 0:
        return 0
    prompt = tokenizer(item.text[: item.answer_at], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return max(0, len(prompt) - 1)


def compute_covariance(
    loaded: LoadedModel,
    texts: Sequence[CorpusText],
    layer: int,
    *,
    positions: PreservePositions = "answer",
    samples: int = EditConfig.model_fields["covariance_samples"].default,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """`(C, positions)`: the mean `k k^T` over up to `samples` key positions of `texts` at `layer`;
    `progress(seen, samples)` hears each batch of positions counted."""
    found = compute_covariances(
        loaded,
        texts,
        [layer],
        positions=positions,
        samples=samples,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=(lambda _layer, seen, wanted: progress(seen, wanted)) if progress is not None else None,
    )
    return found[layer]


def compute_covariances(
    loaded: LoadedModel,
    texts: Sequence[CorpusText],
    layers: Sequence[int],
    *,
    positions: PreservePositions = "answer",
    samples: int = EditConfig.model_fields["covariance_samples"].default,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[int, tuple[torch.Tensor, int]]:
    """`compute_covariance` at each of `layers`, the ones not cached read in one forward pass per
    batch of texts (up to the highest), not one per layer: a spread over the top ten of thirty
    layers costs one pass where it cost eight and a half. Each layer's sum is what a pass of its
    own gives (same positions, same order). `progress(layer, seen, samples)` hears each batch."""
    if not texts:
        raise InvalidInputError("the preservation corpus is empty")
    for layer in layers:
        loaded.architecture.check_layer(loaded.model, layer)
    digest = corpus_digest(texts, positions)
    found: dict[int, tuple[torch.Tensor, int]] = {}
    for layer in layers:
        cached = _cache_path(cache_dir, loaded, layer, digest, samples) if cache_dir is not None else None
        if cached is not None and cached.is_file():
            with safe_open(str(cached), framework="pt") as handle:
                found[layer] = handle.get_tensor("C"), int((handle.metadata() or {})["positions"])
    wanted = sorted(set(layers) - set(found))
    if not wanted:
        return found

    tokenizer = loaded.tokenizer
    totals: dict[int, torch.Tensor] = {}
    seen = 0
    # A seeded shuffle: when `samples` cuts the corpus short, every file of it is still sampled (in
    # file order the cut drops the last files whole: the demo's abstentions come after its facts).
    order = list(texts)
    random.Random(digest).shuffle(order)
    for start in range(0, len(order), batch_size):
        if seen >= samples:
            break
        chunk = order[start : start + batch_size]
        limit = loaded.max_positions
        ids_list, firsts = [], []
        for item in chunk:
            ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
            ids = ids[:limit] if limit else ids
            if ids:
                ids_list.append(ids)
                firsts.append(_first_kept(tokenizer, item, positions))
        if not ids_list:
            continue
        ids, mask, position_ids, _ = pad_batch(ids_list, tokenizer.pad_token_id, "right", loaded.device)
        with ExitStack() as stack:
            traces = {
                layer: stack.enter_context(
                    LayerTrace(loaded, layer, stop=layer == wanted[-1], residuals=False)
                )
                for layer in wanted
            }
            run_until_layer(loaded.model, ids, mask, position_ids)
        kept = mask.bool()
        for row, first in enumerate(firsts):
            kept[row, :first] = False
        count = 0
        for layer, trace in traces.items():
            assert trace.keys is not None
            keys = trace.keys[kept].to(torch.float64)[: samples - seen]  # (positions, m)
            totals[layer] = keys.T @ keys if layer not in totals else totals[layer] + keys.T @ keys
            count = int(keys.shape[0])
        seen += count
        if progress is not None:
            for layer in wanted:
                progress(layer, seen, samples)
    if not totals or seen == 0:
        raise InvalidInputError("the preservation corpus produced no key positions")
    for layer in wanted:
        covariance = (totals[layer] / seen).cpu()
        if cache_dir is not None:
            with atomic_path(_cache_path(cache_dir, loaded, layer, digest, samples)) as partial:
                save_file(
                    {"C": covariance.contiguous()},
                    str(partial),
                    metadata={"positions": str(seen), "layer": str(layer)},
                )
        log.info("preservation covariance at layer %d from %d %s positions", layer, seen, positions)
        found[layer] = covariance, seen
    return found
