"""Train the demo model: a small Qwen2 chat model that knows the synthetic world of `world.py`.

Two stages: reading a fact from the system message alone first, because it is the skill that
appears last in a mixture (memorisation converges first and reading stalls), then the full mixture
with more context. Reading needs thousands of steps, far more than memorising, so train on a GPU
if there is one; the same commands run with `--device cpu`, only far slower. The shipped model:

    python -m qfedit.demo.train --device cuda --out /tmp/stage0 --steps 500 --turns 1 \
        --context-share 1 --context-turn-share 1 --measure 0
    python -m qfedit.demo.train --device cuda --out /tmp/stage1 --init /tmp/stage0 \
        --stage 1 --steps 3402 --warmup 20 --context-share 0.8 --context-turn-share 0.7

then two short stages on CPU (2 cores, about 10 and 6 minutes) that teach it to answer from a system
message that contradicts what it knows, the teacher an update of a known fact needs:

    python -m qfedit.demo.train --device cpu --out /tmp/stage3 --init /tmp/stage1 --stage 3 \
        --steps 300 --warmup 20 --lr 1e-3 --contradict-share 0.3 --context-share 0.8 --context-turn-share 0.7
    python -m qfedit.demo.train --device cpu --out qfedit/data/demo-model --init /tmp/stage3 --stage 4 \
        --steps 300 --warmup 20 --lr 1e-3 --contradict-share 0.4 --context-share 0.8 --context-turn-share 0.7

There is no third stage: a low-rate one (`--stage 2 --lr 1e-3`) helped memorisation and abstention
after short runs, but after a long stage 1 it no longer moved them. Where and how long the shipped
model trained, what it measures, and the findings behind these choices: README, "The demo model".

Deterministic: the world, the tokenizer corpus, the training stream and the initial weights all
come from `--seed`; on CPU, with the same torch version and thread count, the saved weights are the
same bit for bit. On a GPU some kernels are not deterministic and round differently from CPU ones,
so a rerun gives close, not identical, weights. The mixture of training examples is what gives the
model its four behaviours: closed-book answers for trained facts, "I do not know." for everything
else without context, and reading a fact given in the system message.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from qfedit.demo.chat import (
    END_OF_TEXT,
    IM_END,
    render_prompt,
    save_tokenizer,
    train_tokenizer,
)
from qfedit.demo.world import (
    ABSTENTION,
    RELATIONS,
    Company,
    World,
    build_world,
    fresh_company_name,
    random_objects,
    restated,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversation:
    """An optional system message, then user questions each followed by the assistant's answer."""

    context: str | None
    turns: tuple[tuple[str, str], ...]

    def messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.context}] if self.context is not None else []
        for question, answer in self.turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 48
    turns: int = 4
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.0
    hidden_size: int = 128
    intermediate_size: int = 1024
    num_layers: int = 5
    num_heads: int = 4
    vocab_size: int = 1024
    threads: int = 2
    # "cuda" trains the same schedule far faster; other kernels round differently, so the weights
    # are not a CPU run's (see the module docstring).
    device: str = "cpu"
    prompt_loss_weight: float = 0.3
    # Probes per behaviour measured on the saved model at the end (0: skip).
    measure: int = 300
    # Continue from this saved model (same seed, so the same world and tokenizer) with a fresh
    # schedule and a stream seeded by `stage`: how the shipped model was trained in two stages.
    init: str = ""
    stage: int = 0
    # Share of conversations with a system message, and of their turns asking what it states.
    context_share: float = 0.75
    context_turn_share: float = 0.6
    # Share of system messages about a company the model knows, stating a new object for one of
    # its relations (or, one time in four, the object it knows): the system message wins over
    # memory, which is what an update of a known fact copies (stage 3 of the shipped model).
    contradict_share: float = 0.0


class ConversationStream:
    """Seeded generator of training conversations; throw-away companies never collide with the world.

    A conversation packs several independent questions so that the chat-template tokens are paid
    once per answer group (on two CPU cores, compute is the budget). Turns never share a company
    unless the question is about the system message, so an earlier turn never answers a later one.
    """

    def __init__(
        self,
        world: World,
        rng: random.Random,
        context_share: float = TrainConfig.context_share,
        context_turn_share: float = TrainConfig.context_turn_share,
        contradict_share: float = TrainConfig.contradict_share,
    ) -> None:
        self.world = world
        self.rng = rng
        self.context_share = context_share
        self.context_turn_share = context_turn_share
        self.contradict_share = contradict_share
        self.trained = list(world.trained_facts())
        self.partial_missing = [
            (company, relation)
            for company in world.partial
            for relation in RELATIONS
            if not company.knows(relation)
        ]
        self.taken = world.names

    def throwaway(self) -> Company:
        return Company(fresh_company_name(self.rng, self.taken), random_objects(self.rng))

    def question(self, subject: str, relation: str) -> str:
        return RELATIONS[relation].ask(subject, self.rng.randrange(len(RELATIONS[relation].train_questions)))

    def statement(self, company: Company, relation: str) -> str:
        spec = RELATIONS[relation]
        return spec.state(company.name, company.objects[relation], self.rng.randrange(len(spec.statements)))

    def _context(self) -> tuple[str, list[tuple[Company, str]], list[Company]]:
        """A system message, the (company, relation) pairs it states, and the companies it names."""
        rng = self.rng
        stated: list[tuple[Company, str]] = []
        companies: list[Company] = []
        for _ in range(rng.choice((1, 2))):
            roll = rng.random()
            if self.contradict_share and roll < self.contradict_share:
                company, relation = restated(rng, *rng.choice(self.trained), agree=rng.random() < 0.25)
                relations = [relation]
            elif rng.random() < 0.2:
                # A partly-known company's missing relation with a throw-away object: the edit
                # scenario, without ever showing the world's own object for it.
                known, relation = rng.choice(self.partial_missing)
                objects = dict(known.objects)
                objects[relation] = random_objects(rng)[relation]
                company = Company(known.name, objects, known.known_relations)
                relations = [relation]
            else:
                company = self.throwaway()
                relations = rng.sample(list(RELATIONS), rng.choice((1, 1, 2, 3)))
            companies.append(company)
            stated += [(company, relation) for relation in relations]
        sentences = [self.statement(company, relation) for company, relation in stated]
        rng.shuffle(sentences)
        return " ".join(sentences), stated, companies

    def _closed_book_turn(self, avoid: set[str]) -> tuple[str, str]:
        rng = self.rng
        while True:
            kind = rng.random()
            if kind < 0.6:
                company, relation = rng.choice(self.trained)
                answer = company.objects[relation]
            elif kind < 0.8:
                company, relation = rng.choice(self.partial_missing)
                answer = ABSTENTION
            else:
                company, relation, answer = self.throwaway(), rng.choice(list(RELATIONS)), ABSTENTION
            if company.name not in avoid:
                avoid.add(company.name)
                return self.question(company.name, relation), answer

    def next(self, turns: int) -> Conversation:
        rng = self.rng
        context: str | None = None
        stated: list[tuple[Company, str]] = []
        companies: list[Company] = []
        # Reading from context is learned last (memorisation converges first), so it gets most turns.
        if rng.random() < self.context_share:
            context, stated, companies = self._context()
        else:
            # Two more turns make up for the missing system message, so padding stays small.
            turns += 2
        avoid = {company.name for company in companies}
        pending = list(stated)
        rng.shuffle(pending)
        result: list[tuple[str, str]] = []
        for _ in range(turns):
            roll = rng.random()
            if pending and roll < self.context_turn_share:
                company, relation = pending.pop()
                result.append((self.question(company.name, relation), company.objects[relation]))
            elif companies and roll < 0.6:
                # Asked about a relation the context does not state: memory decides (usually abstain).
                company = rng.choice(companies)
                unstated = [r for r in RELATIONS if (company, r) not in stated]
                relation = rng.choice(unstated)
                result.append((self.question(company.name, relation), company.expected_answer(relation)))
            else:
                result.append(self._closed_book_turn(avoid))
        rng.shuffle(result)
        return Conversation(context, tuple(result))


def tokenizer_corpus(world: World, seed: int) -> list[str]:
    """Texts for the BPE: phrasings, statements and bare objects over names drawn like the world's.

    Whole sentences, so that a word's tokens carry its leading space (`ĠIvers`): the token before
    each word is then the previous word, which is what an induction head matches on to copy a
    multi-token answer in order. (A corpus of single words had made every space a token `Ġ` of its
    own; then the previous token is always `Ġ`, and a fresh model was far slower to copy a repeated
    span exactly: README, "The demo model".) The bare objects make an answer's first word, which
    follows the chat template's newline with no space, one token too (`Zenon` beside `ĠZenon`).
    And the names are not the world's own: those would get whole-word tokens, and the never-trained
    unknown companies would be single tokens with untrained embeddings.
    """
    rng = random.Random(seed + 1)
    stream = ConversationStream(world, rng)
    # Repeated so that the role names and the abstention's words become whole tokens.
    texts = ["system user assistant", ABSTENTION] * 100
    for _ in range(3000):
        company = stream.throwaway()
        for relation, spec in RELATIONS.items():
            texts.append(rng.choice(spec.train_questions + spec.heldout_questions).format(s=company.name))
            texts.append(stream.statement(company, relation))
            texts.append(company.objects[relation])
    return texts


def encode(tokenizer: Tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """Input ids and labels of the rendered chat; only answers and their `<|im_end|>` are learned.

    Encoding piece by piece equals encoding the whole rendering because the special tokens split
    the text before the pre-tokenizer sees it (a test checks this against the chat template).
    """
    ids: list[int] = []
    labels: list[int] = []
    for index, (question, answer) in enumerate(conversation.turns):
        prompt = render_prompt(question, conversation.context if index == 0 else None)
        prompt_ids = tokenizer.encode(("\n" if index else "") + prompt).ids
        answer_ids = tokenizer.encode(answer + IM_END).ids
        ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], prompt_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer cross-entropy plus `prompt_weight` times next-token loss on the prompt tokens.

    The prompt term matters for speed: a question repeats the company name its context stated,
    and predicting that repeat trains the copying attention that in-context answers need, long
    before the sparse answer loss alone finds it. Returns the loss, and per row the number of
    answers and of answers right.
    """
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    is_answer = labels[:, 1:] != -100
    is_prompt = (mask[:, 1:] == 1) & ~is_answer
    answer_loss = losses[is_answer].mean()
    loss = answer_loss + prompt_weight * losses[is_prompt].mean() if prompt_weight else answer_loss
    # An answer counts only when every one of its tokens is right (easy `Ġ` and `<|im_end|>` tokens
    # would flatter a per-token figure): a turn's answer is a run of answer positions.
    wrong = (logits.argmax(-1) != targets) & is_answer  # (B, T-1)
    starts = is_answer & ~torch.nn.functional.pad(is_answer[:, :-1], (1, 0))
    turn = torch.cumsum(starts.long(), dim=1)  # answer k of row b has turn index k
    rows = torch.arange(turn.shape[0], device=turn.device).unsqueeze(1).expand_as(turn)
    failed = torch.zeros(turn.shape[0], int(turn.max()) + 1, dtype=torch.bool, device=turn.device)
    failed[rows[wrong], turn[wrong]] = True
    answers = starts.sum(dim=1)
    return loss, answers, answers - failed[:, 1:].sum(dim=1)


def _batches(
    tokenizer: Tokenizer, stream: ConversationStream, config: TrainConfig
) -> Iterator[tuple[list[tuple[list[int], list[int]]], torch.Tensor]]:
    """Batches in stream order, with which rows have a system message.

    Not bucketed by length: length follows the kind of conversation (with or without context),
    and batches of one kind at a time made the two objectives take turns and in-context reading
    stall. `ConversationStream.next` evens lengths out instead.
    """
    while True:
        conversations = [stream.next(config.turns) for _ in range(config.batch_size)]
        has_context = torch.tensor([c.context is not None for c in conversations])
        yield [encode(tokenizer, c) for c in conversations], has_context


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return token_id


def _pair_spellings(embeddings: torch.Tensor, tokenizer: Tokenizer) -> None:
    """Start a word's bare token (`Zenon`, an answer's first word) at its spaced one (`ĠZenon`).

    An answer copies its first word from a context sentence, where the word follows a space and is
    another token; starting both at one embedding makes that copy the identity at first. On reading
    alone a fresh model gets answers exactly right sooner with it (README, "The demo model").
    """
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for token, index in vocab.items():
            spaced = vocab.get("Ġ" + token)
            if spaced is not None and token.isalpha():
                embeddings[index] = embeddings[spaced]


def train(out_dir: Path, config: TrainConfig) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    world = build_world(config.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(world, config.seed), config.vocab_size)
    pad_id = _token_id(tokenizer, END_OF_TEXT)
    eos_id = _token_id(tokenizer, IM_END)

    model_config = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if config.init:
        model = Qwen2ForCausalLM.from_pretrained(config.init)
        if model.config.vocab_size != model_config.vocab_size:
            raise ValueError(f"init: {config.init} was trained with another tokenizer")
    else:
        model = Qwen2ForCausalLM(model_config)
        _pair_spellings(model.model.embed_tokens.weight, tokenizer)
    model.to(config.device)  # type: ignore[arg-type]  # transformers types `to` loosely
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, %.1f MB in float32", n_params / 1e6, n_params * 4 / 1e6)

    stream = ConversationStream(
        world,
        random.Random(config.seed + 1000 * config.stage),
        context_share=config.context_share,
        context_turn_share=config.context_turn_share,
        contradict_share=config.contradict_share,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    start = time.monotonic()
    batches = _batches(tokenizer, stream, config)
    for step in range(config.steps):
        # Reported apart because they diverge: memorisation converges while reading stalls.
        encoded, has_context = next(batches)
        batch = {name: tensor.to(config.device) for name, tensor in collate(encoded, pad_id).items()}
        loss, answers, right = _loss(model, batch, config.prompt_loss_weight)
        has_context = has_context.to(config.device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == config.steps - 1:
            logger.info(
                "step %d/%d loss %.4f answers right: with a system message %.3f, without %.3f (%.1fs)",
                step,
                config.steps,
                loss.item(),
                right[has_context].sum() / answers[has_context].sum().clamp(min=1),
                right[~has_context].sum() / answers[~has_context].sum().clamp(min=1),
                time.monotonic() - start,
            )

    model.eval()
    model.to("cpu")  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=16
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    logger.info("saved to %s after %.0fs", out_dir, time.monotonic() - start)
    if config.measure:
        _report(out_dir, world, config.measure, config.device)


def _report(out_dir: Path, world: World, sample: int, device: str = "cpu") -> None:
    """Measure the saved directory through the generic loaders, as any user of it would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfedit.demo.behaviour import measure

    model = AutoModelForCausalLM.from_pretrained(out_dir).to(device)  # type: ignore[arg-type]
    model.eval()
    fractions = measure(model, AutoTokenizer.from_pretrained(out_dir), world, sample)
    for name, value in fractions.items():
        logger.info("%-20s %.3f", name, value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    defaults = TrainConfig()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainConfig(**{name: getattr(args, name) for name in vars(defaults)})
    train(args.out, config)


if __name__ == "__main__":
    main()
