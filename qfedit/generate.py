"""Greedy answers in the chat template, batched, for spot checks and evaluation."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from qfedit.capture import chat_prompt
from qfedit.errors import InvalidInputError
from qfedit.modeling import LoadedModel


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    """Tokens generated, the end-of-sequence token not counted."""
    stopped: bool
    """The model ended the answer itself, rather than running into `max_new_tokens`."""


def answer_batch(
    loaded: LoadedModel,
    questions: Sequence[str],
    contexts: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """The greedy answer to each question, with its context as the system message when given."""
    generations = generate_batch(
        loaded, questions, contexts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [g.text for g in generations]


def generate_batch(
    loaded: LoadedModel,
    questions: Sequence[str],
    contexts: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[Generation]:
    """`answer_batch` with each answer's token count and whether the model ended it."""
    tokenizer = loaded.tokenizer
    contexts = list(contexts) if contexts is not None else [None] * len(questions)
    if len(contexts) != len(questions):
        raise InvalidInputError(f"{len(contexts)} contexts for {len(questions)} questions")
    prompts = [chat_prompt(tokenizer, q, c) for q, c in zip(questions, contexts, strict=True)]
    return generate_prompts(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def generate_prompts(
    loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 24, batch_size: int = 32
) -> list[Generation]:
    """The greedy continuation of each prompt, already rendered (a chat template's or raw text)."""
    tokenizer = loaded.tokenizer
    answers: list[Generation] = []
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for start in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in chunk)
        # Left padding, so every row's next token follows its own last prompt token.
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        with torch.inference_mode():
            output = loaded.model.generate(  # type: ignore[operator]
                input_ids=ids.to(loaded.device),
                attention_mask=mask.to(loaded.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in output[:, width:].tolist():
            # Generation pads a row that ended before the others with the end token.
            length = next((i for i, token in enumerate(row) if token in ends), len(row))
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(Generation(text, length, length < max_new_tokens))
    return answers


class _Stop(StoppingCriteria):
    """Ends a generation whose reader has gone (a client that closed its stream)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass
class Streamed:
    """What a finished stream produced: its token count and whether the model ended it."""

    tokens: int = 0
    stopped: bool = False


def stream_prompt(
    loaded: LoadedModel, prompt: str, *, max_new_tokens: int = 24, result: Streamed | None = None
) -> Iterator[str]:
    """The greedy continuation of `prompt` as it is generated, in pieces of text (transformers'
    `TextIteratorStreamer`, the generation in a thread). Closing the iterator ends the generation;
    `result` is filled in when it ends."""
    tokenizer = loaded.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(loaded.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # type: ignore[arg-type]
    gone = threading.Event()
    output: list[torch.Tensor] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                output.append(
                    loaded.model.generate(  # type: ignore[operator]
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Stop(gone)]),
                    )
                )
        finally:
            streamer.end()

    worker = threading.Thread(target=run, name="qfedit-stream", daemon=True)
    worker.start()
    try:
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            if piece:
                yield piece
    finally:
        gone.set()
        worker.join()
    if result is not None and output:
        ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        row = output[0][0, ids.shape[1] :].tolist()
        result.tokens = next((i for i, token in enumerate(row) if token in ends), len(row))
        result.stopped = result.tokens < max_new_tokens


def answer(
    loaded: LoadedModel, question: str, context: str | None = None, *, max_new_tokens: int = 24
) -> str:
    return answer_batch(loaded, [question], [context], max_new_tokens=max_new_tokens)[0]
