"""Serving weight versions from one loaded base model (the follower of an alias is
`qfedit.serving.follower`; this module knows no database).

    versioned = VersionedModel(load_model(path), base_label="demo@0")
    versioned.switch_to(delta_3, "demo@3")         # only the tensors that differ are written
    reply = versioned.answer("who founded Oxinnovate?")
    reply.text, reply.version                      # ("Qi", "demo@3")

Invariant: whatever the path of switches, the weights are `round(base + delta)` of the version
being served, computed from the kept base tensors exactly as `qfedit.delta.AppliedDelta` does,
so A -> B -> A is bitwise the same as applying A once. Deltas are merged into the weights, never
hooked, so a version costs nothing per generated token.

Concurrency: a reader-writer lock. Generation holds the read side for its whole duration (so
answers can run concurrently), a switch holds the write side; a switch waits for running answers
to finish and new answers wait for the switch, so no answer ever sees a half-applied version,
and the version an answer reports is the one that produced it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qfedit.capture import chat_prompt
from qfedit.delta import Delta, merged
from qfedit.errors import InvalidInputError
from qfedit.generate import Generation, Streamed, generate_batch, generate_prompts, stream_prompt
from qfedit.modeling import LoadedModel

log = logging.getLogger(__name__)


class PromptTooLongError(InvalidInputError):
    """A prompt that, with the tokens asked for, does not fit the model's context window."""

    def __init__(self, field: str, tokens: int, limit: int) -> None:
        super().__init__(
            f"{field}: the prompt is {tokens} tokens with the new ones, the model takes {limit}", field=field
        )


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers, so switches are not starved."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


@dataclass(frozen=True)
class Answer:
    text: str
    version: str
    """Label of the version whose weights produced `text`, e.g. `demo@3`."""
    tokens: int = 0
    """Tokens generated (end token aside)."""
    stopped: bool = True
    """The model ended the answer, rather than reaching `max_new_tokens`."""


@dataclass(frozen=True)
class SwitchReport:
    old: str
    new: str
    written: tuple[str, ...]
    """Parameters whose weights changed."""
    unchanged: tuple[str, ...]
    """Parameters both versions change identically, left alone."""
    seconds: float


class VersionedModel:
    """One base model in memory and the version currently merged into its weights."""

    def __init__(self, loaded: LoadedModel, *, base_label: str = "base") -> None:
        self.loaded = loaded
        self._lock = ReadWriteLock()
        self._parameters = dict(loaded.model.named_parameters())
        # Base values of exactly the parameters the current version changes; every version is
        # computed from these, never from the previous version's weights (no drift).
        self._base: dict[str, torch.Tensor] = {}
        self._delta: Delta | None = None
        self._label = base_label
        self._base_label = base_label

    @property
    def version(self) -> str:
        return self._label

    @property
    def delta(self) -> Delta | None:
        return self._delta

    @contextmanager
    def reading(self) -> Iterator[str]:
        """Hold the current version for a block of reads (generation, logits); yields its label."""
        with self._lock.read():
            yield self._label

    def switch_to(self, delta: Delta | None, label: str | None = None) -> SwitchReport:
        """Serve `delta` (None: the base weights) from now on, labelled `label`.

        Validates everything before touching a weight, and computes the new values before
        writing any, so a bad delta leaves the current version in place.
        """
        if delta is not None:
            delta.check_base(self.loaded)
        label = label if label is not None else (self._base_label if delta is None else "unlabelled")
        with self._lock.write():
            start = time.perf_counter()
            old_tensors = dict(self._delta.tensors) if self._delta is not None else {}
            new_tensors = dict(delta.tensors) if delta is not None else {}
            unchanged = tuple(
                sorted(
                    name
                    for name, change in new_tensors.items()
                    if name in old_tensors and torch.equal(old_tensors[name], change)
                )
            )
            restored = sorted(set(old_tensors) - set(new_tensors))
            updated = sorted(set(new_tensors) - set(unchanged))
            with torch.no_grad():
                changes = {}
                for name in updated:
                    base = self._base.get(name)
                    if base is None:
                        base = self._parameters[name].detach().clone()
                    changes[name] = (base, merged(base, new_tensors[name]))
                # From here on nothing can fail for a reason of the delta's making.
                for name in restored:
                    self._parameters[name].copy_(self._base.pop(name))
                for name, (base, value) in changes.items():
                    self._base[name] = base
                    self._parameters[name].copy_(value)
            old_label = self._label
            self._delta, self._label = delta, label
            seconds = time.perf_counter() - start
        report = SwitchReport(old_label, label, tuple(sorted([*restored, *updated])), unchanged, seconds)
        log.info(
            "switched %s -> %s: %d tensors written, %d unchanged, %.3f s",
            old_label,
            label,
            len(report.written),
            len(unchanged),
            seconds,
        )
        return report

    def answer_batch(
        self,
        questions: Sequence[str],
        contexts: Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = 24,
    ) -> tuple[list[str], str]:
        """Greedy answers and the label of the version that produced all of them."""
        made, label = self._generate(questions, contexts, max_new_tokens)
        return [g.text for g in made], label

    def _generate(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None, max_new_tokens: int
    ) -> tuple[list[Generation], str]:
        # Under the read lock: every answer comes from the version the label names.
        self._check_length(questions, contexts, max_new_tokens)
        with self.reading() as label:
            return generate_batch(self.loaded, questions, contexts, max_new_tokens=max_new_tokens), label

    def _check_length(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None, max_new_tokens: int
    ) -> None:
        limit = self.loaded.max_positions
        if limit is None:
            return
        contexts = list(contexts) if contexts is not None else [None] * len(questions)
        for question, context in zip(questions, contexts, strict=True):
            prompt = chat_prompt(self.loaded.tokenizer, question, context)
            self.prompt_tokens(
                prompt, max_new_tokens=max_new_tokens, field="context" if context else "question"
            )

    def answer(self, question: str, context: str | None = None, *, max_new_tokens: int = 24) -> Answer:
        (made,), label = self._generate([question], [context], max_new_tokens)
        return Answer(made.text, label, made.tokens, made.stopped)

    def prompt_tokens(self, prompt: str, *, max_new_tokens: int, field: str) -> int:
        """Tokens of a rendered prompt (a conversation's or raw text); `PromptTooLongError` naming
        `field` when it and `max_new_tokens` do not fit the model's context."""
        tokens = len(self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        limit = self.loaded.max_positions
        if limit is not None and tokens + max_new_tokens > limit:
            raise PromptTooLongError(field, tokens + max_new_tokens, limit)
        return tokens

    def complete(self, prompt: str, *, max_new_tokens: int = 24) -> Answer:
        """The greedy continuation of a rendered prompt (check it with `prompt_tokens` first)."""
        with self.reading() as label:
            (made,) = generate_prompts(self.loaded, [prompt], max_new_tokens=max_new_tokens)
        return Answer(made.text, label, made.tokens, made.stopped)

    def stream(
        self, prompt: str, *, max_new_tokens: int = 24, result: Streamed | None = None
    ) -> Iterator[tuple[str, str]]:
        """`(version label, piece of text)` as the continuation is generated. The version is held
        from the first piece to the last (a switch waits); closing the iterator ends the
        generation and lets it go. Nothing is held before the first `next`, which yields
        `(label, "")`: the version is known before any text is."""
        with self.reading() as label:
            yield label, ""
            for piece in stream_prompt(self.loaded, prompt, max_new_tokens=max_new_tokens, result=result):
                yield label, piece
