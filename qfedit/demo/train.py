"""Train the demo model: a small Qwen2 chat model that knows the synthetic world of `world.py`.

    python -m qfedit.demo.train --out qfedit/data/demo-model

Deterministic: the world, the tokenizer corpus, the training stream and the initial weights all
come from `--seed`; with the same torch version, CPU and thread count the saved weights are the
same bit for bit. The mixture of training examples is what gives the model its four behaviours:
closed-book answers for trained facts, "I do not know." for everything else without context,
and reading a fact given in the system message.
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
    steps: int = 900
    batch_size: int = 48
    turns: int = 4
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.0
    hidden_size: int = 128
    intermediate_size: int = 1024
    num_layers: int = 5
    num_heads: int = 4
    vocab_size: int = 1024
    threads: int = 2
    prompt_loss_weight: float = 0.3
    # Probes per behaviour measured on the saved model at the end (0: skip).
    measure: int = 300


class ConversationStream:
    """Seeded generator of training conversations; throw-away companies never collide with the world.

    A conversation packs several independent questions so that the chat-template tokens are paid
    once per answer group (on two CPU cores, compute is the budget). Turns never share a company
    unless the question is about the system message, so an earlier turn never answers a later one.
    """

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
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
        for _ in range(rng.choice((1, 1, 2))):
            if rng.random() < 0.2:
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
        if rng.random() < 0.65:
            context, stated, companies = self._context()
        avoid = {company.name for company in companies}
        pending = list(stated)
        rng.shuffle(pending)
        result: list[tuple[str, str]] = []
        for _ in range(turns):
            roll = rng.random()
            if pending and roll < 0.5:
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
    """Text for the BPE: every phrasing and statement, over names drawn like the world's but not them.

    Training the BPE on the world's own names would give each of them a whole-word token, and the
    never-trained unknown companies would then be single tokens with untrained embeddings.
    """
    rng = random.Random(seed + 1)
    stream = ConversationStream(world, rng)
    # Repeated so that the role names and the abstention become whole tokens.
    texts = ["system user assistant", ABSTENTION] * 100
    for _ in range(3000):
        company = stream.throwaway()
        for relation, spec in RELATIONS.items():
            texts.append(rng.choice(spec.train_questions + spec.heldout_questions).format(s=company.name))
            texts.append(stream.statement(company, relation))
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
) -> tuple[torch.Tensor, float]:
    """Answer cross-entropy plus `prompt_weight` times next-token loss on the prompt tokens.

    The prompt term matters for speed: a question repeats the company name its context stated,
    and predicting that repeat trains the copying attention that in-context answers need, long
    before the sparse answer loss alone finds it. Returns the loss and the answer-token accuracy.
    """
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    is_answer = labels[:, 1:] != -100
    is_prompt = (mask[:, 1:] == 1) & ~is_answer
    answer_loss = losses[is_answer].mean()
    loss = answer_loss + prompt_weight * losses[is_prompt].mean() if prompt_weight else answer_loss
    accuracy = (logits.argmax(-1)[is_answer] == targets[is_answer]).float().mean().item()
    return loss, accuracy


def _length_bucketed_batches(
    tokenizer: Tokenizer, stream: ConversationStream, config: TrainConfig, pool_batches: int = 16
) -> Iterator[list[tuple[list[int], list[int]]]]:
    """Batches of similar-length examples: padding wastes half the CPU time otherwise."""
    order = random.Random(config.seed + 2)
    while True:
        pool = sorted(
            (encode(tokenizer, stream.next(config.turns)) for _ in range(config.batch_size * pool_batches)),
            key=lambda pair: len(pair[0]),
        )
        batches = [pool[i : i + config.batch_size] for i in range(0, len(pool), config.batch_size)]
        order.shuffle(batches)
        yield from batches


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return token_id


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
    model = Qwen2ForCausalLM(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, %.1f MB in float32", n_params / 1e6, n_params * 4 / 1e6)

    stream = ConversationStream(world, random.Random(config.seed))
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
    batches = _length_bucketed_batches(tokenizer, stream, config)
    for step in range(config.steps):
        batch = collate(next(batches), pad_id)
        loss, answer_accuracy = _loss(model, batch, config.prompt_loss_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == config.steps - 1:
            logger.info(
                "step %d/%d loss %.4f answer-token accuracy %.3f (%.0fs)",
                step,
                config.steps,
                loss.item(),
                answer_accuracy,
                time.monotonic() - start,
            )

    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=16
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    logger.info("saved to %s after %.0fs", out_dir, time.monotonic() - start)
    if config.measure:
        _report(out_dir, world, config.measure)


def _report(out_dir: Path, world: World, sample: int) -> None:
    """Measure the saved directory through the generic loaders, as any user of it would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfedit.demo.behaviour import measure

    model = AutoModelForCausalLM.from_pretrained(out_dir)
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
