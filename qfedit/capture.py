"""Capture of keys and residuals at one layer, with and without a fact's context.

    with LayerTrace(loaded, layer=20) as trace:
        run_until_layer(loaded.model, input_ids, attention_mask)
    trace.keys      # (B, T, m) input of down_proj
    trace.residuals # (B, T, d) residual stream entering the MLP block

Each fact is run teacher-forced twice in the model's chat template: with its context as the
system message and without it. The positions that predict the answer tokens (and the end-of-turn
token) are aligned from the end of the sequence, which is the same on both sides because the
answer is tokenised on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qfedit.architectures import OutputNorm
from qfedit.errors import InvalidInputError
from qfedit.facts import Fact, FactError, FactLimits
from qfedit.modeling import LoadedModel

PaddingSide = Literal["left", "right"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the traced layer has been read."""


class LayerTrace:
    """Record the residual entering layer `layer`'s MLP and the key entering its `down_proj`.

    Hooks are registered on enter and removed on every exit path. With `stop=True` the forward
    pass ends at the `down_proj` of the traced layer: nothing after it is needed.
    """

    def __init__(self, loaded: LoadedModel, layer: int, *, stop: bool = True, residuals: bool = True) -> None:
        loaded.architecture.check_layer(loaded.model, layer)
        self._residual_module = loaded.architecture.residual_module(loaded.model, layer)
        self._down_proj = loaded.architecture.down_proj_module(loaded.model, layer)
        self._stop = stop
        self._want_residuals = residuals
        self._handles: list[RemovableHandle] = []
        self.keys: torch.Tensor | None = None
        self.residuals: torch.Tensor | None = None

    def _on_residual(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.residuals = args[0].detach()

    def _on_key(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.keys = args[0].detach()
        if self._stop:
            raise StopForward

    def __enter__(self) -> LayerTrace:
        try:
            if self._want_residuals:
                self._handles.append(self._residual_module.register_forward_pre_hook(self._on_residual))
            self._handles.append(self._down_proj.register_forward_pre_hook(self._on_key))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.close()
        # Swallow only our own early stop; every other error propagates.
        return exc_type is StopForward


@dataclass(frozen=True)
class EncodedFact:
    """Token ids of both sides of a fact, and the weight of each answer-predicting position."""

    with_context: list[int]
    without_context: list[int]
    weights: list[float]
    """One per predicted token (answer tokens, then end-of-turn), from the end of the sequence."""


def _chat_prefix(tokenizer: object, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected text")
    return text


def conversation_prompt(tokenizer: object, messages: Sequence[Mapping[str, str]]) -> str:
    """The generation prompt for a conversation (`{"role", "content"}` messages, as a chat
    template takes them), ready for the assistant's next turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidInputError(
            "the model's tokenizer has no chat template; give one (--chat-template) to use this model"
        )
    return _chat_prefix(tokenizer, [dict(m) for m in messages])


def chat_prompt(tokenizer: object, question: str, context: str | None = None) -> str:
    """The generation prompt for a question, with `context` as the system message when given."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidInputError(
            "the model's tokenizer has no chat template; give one (--chat-template) to use this model"
        )
    messages = [{"role": "system", "content": context}] if context is not None else []
    messages.append({"role": "user", "content": question})
    return _chat_prefix(tokenizer, messages)


def token_words(tokenizer: object, answer: str) -> tuple[list[int], list[int]]:
    """The answer's token ids, and for each token the index of its word (`Fact.answer_words`)."""
    encoding = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    spans = [match.span() for match in re.finditer(r"\S+", answer)]
    words = []
    for start, _ in encoding["offset_mapping"]:
        # A token belongs to the first word that ends after it starts: the word it overlaps, or
        # for a whitespace-only token the word that follows it.
        words.append(next((i for i, (_, word_end) in enumerate(spans) if start < word_end), len(spans) - 1))
    return list(encoding["input_ids"]), words


def _token_weights(
    tokenizer: object, answer: str, significance: Sequence[float], where: str
) -> tuple[list[int], list[float]]:
    ids, words = token_words(tokenizer, answer)
    if not ids:
        raise FactError(where, "answer", "tokenises to no tokens")
    return ids, [significance[word] for word in words]


def encode_fact(
    loaded: LoadedModel, fact: Fact, where: str, *, include_eos: bool = True, eos_significance: float = 1.0
) -> EncodedFact:
    """Token ids of both prompts; raises `FactError` naming `where` and the field at fault."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise FactError(
            where, "context", "the model's tokenizer has no chat template to place the context in"
        )
    limit = loaded.max_positions
    # Counted before anything is tokenized: a fact of megabytes is refused in no time.
    FactLimits().for_positions(limit).check_prompt(fact, where)
    with_prefix = tokenizer(chat_prompt(tokenizer, fact.question, fact.context), add_special_tokens=False)[
        "input_ids"
    ]
    without_prefix = tokenizer(chat_prompt(tokenizer, fact.question), add_special_tokens=False)["input_ids"]
    answer_ids, weights = _token_weights(tokenizer, fact.answer, fact.word_significance(), where)
    if include_eos and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        weights = [*weights, eos_significance]
    if limit is not None:
        if len(without_prefix) + len(answer_ids) > limit:
            raise FactError(
                where,
                "question",
                f"prompt is {len(without_prefix) + len(answer_ids)} tokens, the model's context is {limit}",
            )
        if len(with_prefix) + len(answer_ids) > limit:
            raise FactError(
                where,
                "context",
                f"prompt is {len(with_prefix) + len(answer_ids)} tokens, the model's context is {limit}",
            )
    return EncodedFact(
        with_context=list(with_prefix) + answer_ids,
        without_context=list(without_prefix) + answer_ids,
        weights=weights,
    )


def check_fits(
    loaded: LoadedModel, fact: Fact, where: str, limits: FactLimits, *, include_eos: bool = True
) -> None:
    """Raise `FactError` naming `where` and the field when `fact` is over `limits` or its prompts
    are longer than the model's context. Characters are counted first, so only a fact of bounded
    size is ever tokenized: what a worker checks before it captures anything."""
    limits.for_positions(loaded.max_positions).check(fact, where)
    encode_fact(loaded, fact, where, include_eos=include_eos)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: PaddingSide, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad to one length; returns ids, attention mask, position ids and each sequence's offset."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    offsets = []
    for row, seq in enumerate(sequences):
        offset = length - len(seq) if side == "left" else 0
        ids[row, offset : offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, offset : offset + len(seq)] = 1
        offsets.append(offset)
    # Positions count real tokens only, so a left-padded sequence sees the same rotary phases
    # as when it runs alone.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), offsets


def answer_logits(
    loaded: LoadedModel, rows: Sequence[tuple[list[int], int]], batch_size: int = 32
) -> Iterator[torch.Tensor]:
    """For each `(token ids, n)`, teacher-forced in batches, the float32 logits `(n, vocab)` at the
    positions that predict its last `n` tokens, in order."""
    tokenizer = loaded.tokenizer
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, positions, _ = pad_batch(
            [r[0] for r in chunk], tokenizer.pad_token_id, "right", loaded.device
        )
        with torch.inference_mode():
            logits = loaded.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        for row, (sequence, count) in enumerate(chunk):
            end = len(sequence)
            yield logits[row, end - count - 1 : end - 1].float()


def run_until_layer(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
    """A forward pass meant to be cut short by a `LayerTrace` with `stop=True`."""
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)


@dataclass
class Capture:
    """Activations at the answer-predicting positions of a set of facts, one row a position."""

    keys_with: torch.Tensor  # (n, m) x_i
    keys_without: torch.Tensor  # (n, m) y_i
    residuals_with: torch.Tensor  # (n, d) v_i
    residuals_without: torch.Tensor  # (n, d) v'_i
    weights: torch.Tensor  # (n,) s_i
    fact_index: torch.Tensor  # (n,) which fact (index into the captured list) a row belongs to
    layer: int
    output_norm: OutputNorm | None = None
    """The layer's norm on the MLP's output, where it has one (the block outputs `v + N(W k)`)."""
    tokens: torch.Tensor | None = None
    """(n,) the token each position predicts (teacher-forced)."""

    def block_outputs(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output `v + W k` (`v + N(W k)`) with and without the context, (n, d) float64."""
        w = weight.to(torch.float64)
        sides = []
        for keys, residuals in (
            (self.keys_with, self.residuals_with),
            (self.keys_without, self.residuals_without),
        ):
            mlp = keys.to(torch.float64) @ w.T
            if self.output_norm is not None:
                mlp = self.output_norm(mlp)
            sides.append(residuals.to(torch.float64) + mlp)
        return sides[0], sides[1]

    def errors_for(self, weight: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """`errors` for a block output that should gain `gains` (n, d) rather than reach its
        output with the context: `gains` in `down_proj`'s output space, through the norm if any."""
        outputs = self.keys_without.to(torch.float64) @ weight.to(torch.float64).T  # (n, d) W y_i
        if self.output_norm is None:
            return gains
        return self.output_norm.preimage(self.output_norm(outputs) + gains, like=outputs) - outputs

    @property
    def positions(self) -> int:
        return int(self.weights.shape[0])

    def errors(self, weight: torch.Tensor) -> torch.Tensor:
        """`e_i = W x_i + v_i - v'_i - W y_i`, (n, d), in float64, for `W` of shape (d, m).

        With a norm on the MLP's output the block must reach `N(W' y_i) = t_i`, where
        `t_i = N(W x_i) + v_i - v'_i`: `e_i = u_i - W y_i` for the `down_proj` output `u_i` that
        `OutputNorm.preimage` gives for `t_i`."""
        w = weight.to(torch.float64)
        if self.output_norm is None:
            diff = self.keys_with.to(torch.float64) - self.keys_without.to(torch.float64)
            return (
                diff @ w.T + self.residuals_with.to(torch.float64) - self.residuals_without.to(torch.float64)
            )
        outputs_with = self.keys_with.to(torch.float64) @ w.T  # (n, d) W x_i
        outputs_without = self.keys_without.to(torch.float64) @ w.T  # (n, d) W y_i
        targets = (
            self.output_norm(outputs_with)
            + self.residuals_with.to(torch.float64)
            - self.residuals_without.to(torch.float64)
        )
        return self.output_norm.preimage(targets, like=outputs_without) - outputs_without

    @staticmethod
    def concatenate(parts: Sequence[Capture]) -> Capture:
        if not parts:
            raise InvalidInputError("no captures to concatenate")
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += int(part.fact_index.max().item()) + 1 if part.positions else 0
        return Capture(
            keys_with=torch.cat([p.keys_with for p in parts]),
            keys_without=torch.cat([p.keys_without for p in parts]),
            residuals_with=torch.cat([p.residuals_with for p in parts]),
            residuals_without=torch.cat([p.residuals_without for p in parts]),
            weights=torch.cat([p.weights for p in parts]),
            fact_index=torch.cat([p.fact_index + off for p, off in zip(parts, offsets, strict=True)]),
            layer=parts[0].layer,
            output_norm=parts[0].output_norm,
            tokens=torch.cat([p.tokens for p in parts if p.tokens is not None])
            if all(p.tokens is not None for p in parts)
            else None,
        )


@dataclass(frozen=True)
class CaptureOptions:
    batch_size: int = 16
    padding_side: PaddingSide = "right"
    include_eos: bool = True


def _trace_sequences(
    loaded: LoadedModel,
    layer: int,
    sequences: list[list[int]],
    options: CaptureOptions,
    key_layer: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor | None]]:
    """Yield `(sequence index, keys (T, m), residuals (T, d), offset, keys at key_layer or None)`
    for each sequence, batched by length; `key_layer` (below `layer`) is read in the same pass."""
    pad_id = loaded.tokenizer.pad_token_id
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), options.batch_size):
        chunk = order[start : start + options.batch_size]
        ids, mask, positions, offsets = pad_batch(
            [sequences[i] for i in chunk], pad_id, options.padding_side, loaded.device
        )
        with ExitStack() as stack:
            low = (
                stack.enter_context(LayerTrace(loaded, key_layer, stop=False, residuals=False))
                if key_layer is not None
                else None
            )
            trace = stack.enter_context(LayerTrace(loaded, layer))
            run_until_layer(loaded.model, ids, mask, positions)
        if trace.keys is None or trace.residuals is None or (low is not None and low.keys is None):
            raise RuntimeError(f"layer {layer} was not reached by the forward pass")
        for row, index in enumerate(chunk):
            extra = low.keys[row] if low is not None and low.keys is not None else None
            yield index, trace.keys[row], trace.residuals[row], offsets[row], extra


@dataclass
class SideCapture:
    """One side of a set of facts (with or without context) at the answer-predicting positions:
    the top layer's keys and residuals, and the keys of a lower layer read in the same pass."""

    keys: torch.Tensor  # (n, m) at the top layer
    residuals: torch.Tensor  # (n, d) entering the top layer's MLP
    low_keys: torch.Tensor | None  # (n, m) at `key_layer`, when one was asked for
    weights: torch.Tensor  # (n,) s_i
    fact_index: torch.Tensor  # (n,)
    tokens: torch.Tensor  # (n,) the token each position predicts (teacher-forced)
    output_norm: OutputNorm | None = None
    """The top layer's norm on the MLP's output, where it has one."""

    def outputs(self, weight: torch.Tensor) -> torch.Tensor:
        """The top layer's output `v + W k` (`v + N(W k)` with a norm on the MLP's output) at each
        position, (n, d) float64, for `W` (d x m)."""
        mlp = self.keys.to(torch.float64) @ weight.to(torch.float64).T
        if self.output_norm is not None:
            mlp = self.output_norm(mlp)
        return self.residuals.to(torch.float64) + mlp


def capture_side(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    layer: int,
    *,
    context: bool,
    key_layer: int | None = None,
    labels: Sequence[str] | None = None,
    options: CaptureOptions = CaptureOptions(),
) -> SideCapture:
    """Capture one side of `facts` at `layer` (and the keys of `key_layer` < `layer`), at the same
    positions `capture` uses: the multi-layer edit captures its target once and recaptures the side
    without context after each lower layer's edit."""
    if not facts:
        raise InvalidInputError("no facts to capture")
    loaded.architecture.check_layer(loaded.model, layer)
    if key_layer is not None:
        loaded.architecture.check_layer(loaded.model, key_layer)
        if key_layer >= layer:
            raise InvalidInputError(f"key layer {key_layer} must be below layer {layer}")
    names = (
        list(labels) if labels is not None else [fact.id or f"fact {i + 1}" for i, fact in enumerate(facts)]
    )
    encoded = [
        encode_fact(loaded, fact, name, include_eos=options.include_eos)
        for fact, name in zip(facts, names, strict=True)
    ]
    sequences = [e.with_context if context else e.without_context for e in encoded]
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = [
        (torch.empty(0), torch.empty(0), None)
    ] * len(sequences)
    for index, keys, residuals, offset, low in _trace_sequences(loaded, layer, sequences, options, key_layer):
        predicted = len(encoded[index].weights)
        end = offset + len(sequences[index]) - 1
        span = slice(end - predicted, end)
        rows[index] = (keys[span], residuals[span], low[span] if low is not None else None)
    parts: dict[str, list[torch.Tensor]] = {"k": [], "r": [], "l": [], "s": [], "f": [], "t": []}
    for fact, (enc, (keys, residuals, low)) in enumerate(zip(encoded, rows, strict=True)):
        for name, tensor in (("keys", keys), ("residuals", residuals), ("keys", low)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise InvalidInputError(f"{names[fact]}: non-finite {name} (overflow in the model's dtype?)")
        weights = torch.tensor(enc.weights, dtype=torch.float64)
        keep = weights > 0
        parts["k"].append(keys[keep.to(keys.device)])
        parts["r"].append(residuals[keep.to(residuals.device)])
        if low is not None:
            parts["l"].append(low[keep.to(low.device)])
        parts["s"].append(weights[keep])
        parts["f"].append(torch.full((int(keep.sum()),), fact, dtype=torch.long))
        told = torch.tensor(sequences[fact][len(sequences[fact]) - len(enc.weights) :], dtype=torch.long)
        parts["t"].append(told[keep])
    return SideCapture(
        keys=torch.cat(parts["k"]),
        residuals=torch.cat(parts["r"]),
        low_keys=torch.cat(parts["l"]) if parts["l"] else None,
        weights=torch.cat(parts["s"]),
        fact_index=torch.cat(parts["f"]),
        tokens=torch.cat(parts["t"]),
        output_norm=loaded.architecture.output_norm(loaded.model, layer),
    )


def capture(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    layer: int,
    *,
    labels: Sequence[str] | None = None,
    options: CaptureOptions = CaptureOptions(),
) -> Capture:
    """Capture keys and residuals for `facts` at `layer` in batched, teacher-forced forward passes.

    `labels` name each fact in errors (e.g. "facts.jsonl line 3"); positions of significance 0
    are dropped. Raises `FactError` for a fact that cannot be used, before any result is returned.
    """
    if not facts:
        raise InvalidInputError("no facts to capture")
    loaded.architecture.check_layer(loaded.model, layer)
    names = (
        list(labels) if labels is not None else [fact.id or f"fact {i + 1}" for i, fact in enumerate(facts)]
    )
    if len(names) != len(facts):
        raise InvalidInputError(f"{len(names)} labels for {len(facts)} facts")
    encoded = [
        encode_fact(loaded, fact, name, include_eos=options.include_eos)
        for fact, name in zip(facts, names, strict=True)
    ]
    sequences = [e.with_context for e in encoded] + [e.without_context for e in encoded]

    n_facts = len(facts)
    keys: list[torch.Tensor | None] = [None] * len(sequences)
    residuals: list[torch.Tensor | None] = [None] * len(sequences)
    for index, seq_keys, seq_residuals, offset, _ in _trace_sequences(loaded, layer, sequences, options):
        fact = index % n_facts
        predicted = len(encoded[fact].weights)
        # Position p predicts token p + 1: the last `predicted` tokens are predicted by the
        # positions just before them.
        end = offset + len(sequences[index]) - 1
        rows = slice(end - predicted, end)
        keys[index] = seq_keys[rows]
        residuals[index] = seq_residuals[rows]

    parts: dict[str, list[torch.Tensor]] = {"kw": [], "ko": [], "rw": [], "ro": [], "s": [], "f": [], "t": []}
    for fact, enc in enumerate(encoded):
        kw, ko, rw, ro = keys[fact], keys[fact + n_facts], residuals[fact], residuals[fact + n_facts]
        assert kw is not None and ko is not None and rw is not None and ro is not None
        for name, tensor in (("keys", kw), ("keys", ko), ("residuals", rw), ("residuals", ro)):
            if not torch.isfinite(tensor).all():
                raise InvalidInputError(
                    f"{names[fact]}: non-finite {name} at layer {layer} (overflow in the model's dtype?)"
                )
        weights = torch.tensor(enc.weights, dtype=torch.float64)
        keep = weights > 0
        parts["kw"].append(kw[keep.to(kw.device)])
        parts["ko"].append(ko[keep.to(ko.device)])
        parts["rw"].append(rw[keep.to(rw.device)])
        parts["ro"].append(ro[keep.to(ro.device)])
        parts["s"].append(weights[keep])
        parts["f"].append(torch.full((int(keep.sum()),), fact, dtype=torch.long))
        without = sequences[fact + n_facts]
        parts["t"].append(torch.tensor(without[len(without) - len(enc.weights) :], dtype=torch.long)[keep])
    return Capture(
        keys_with=torch.cat(parts["kw"]),
        keys_without=torch.cat(parts["ko"]),
        residuals_with=torch.cat(parts["rw"]),
        residuals_without=torch.cat(parts["ro"]),
        weights=torch.cat(parts["s"]),
        fact_index=torch.cat(parts["f"]),
        layer=layer,
        output_norm=loaded.architecture.output_norm(loaded.model, layer),
        tokens=torch.cat(parts["t"]),
    )
