"""Capture throughput: batched capture vs the seed's way vs a plain forward pass (prints a table).

    python bench/capture_speed.py                      # the demo model, its edit facts
    python bench/capture_speed.py --random-config qwen2.5-1.5b --device cuda --dtype bfloat16

The seed's way, re-implemented faithfully: for each fact and side, decode greedily with the answer
forced token by token, hooks on the MLP at every step, and a load-concatenate-save of the
captured tensors after every token: once with a KV cache (the kinder reading, which the
"vs seed's way" column is against) and once rerunning the prefix at every token. The plain forward runs the same batches as the
batched capture through the whole model with no hooks: the limit a capture can approach.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from qfedit.capture import CaptureOptions, LayerTrace, capture, chat_prompt, encode_fact, pad_batch
from qfedit.facts import Fact, read_jsonl
from qfedit.modeling import LoadedModel, load_model

QWEN25_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def seed_way(loaded: LoadedModel, facts: list[Fact], layer: int, folder: Path, kv_cache: bool = True) -> None:
    """With `kv_cache=False` every forced token reruns the whole prefix, as a loop over
    `generate(max_new_tokens=1)` does; with it, only the new token runs (the kinder reading)."""
    tokenizer = loaded.tokenizer
    model = loaded.model
    for index, fact in enumerate(facts):
        encoded = encode_fact(loaded, fact, f"fact {index}")
        answer = encoded.with_context[-len(encoded.weights) :]
        for side, context in (("with", fact.context), ("without", None)):
            prompt = tokenizer(chat_prompt(tokenizer, fact.question, context), add_special_tokens=False)[
                "input_ids"
            ]
            path = folder / f"{index}-{side}.safetensors"
            sequence = list(prompt)
            step = torch.tensor([prompt], device=loaded.device)
            cache = None
            for token in answer:
                with LayerTrace(loaded, layer, stop=False) as trace, torch.inference_mode():
                    out = model(input_ids=step, past_key_values=cache, use_cache=kv_cache)
                cache = out.past_key_values if kv_cache else None
                _ = out.logits[0, -1].argmax()  # the greedy choice, overridden by the forced answer token
                assert trace.keys is not None and trace.residuals is not None
                new = {"keys": trace.keys[0, -1:].cpu(), "residuals": trace.residuals[0, -1:].cpu()}
                if path.exists():
                    old = load_file(str(path))
                    new = {name: torch.cat([old[name], new[name]]) for name in new}
                save_file(new, str(path))
                sequence.append(token)
                step = torch.tensor([[token]] if kv_cache else [sequence], device=loaded.device)


def plain_forward(loaded: LoadedModel, facts: list[Fact], batch_size: int) -> None:
    encoded = [encode_fact(loaded, fact, f"fact {i}") for i, fact in enumerate(facts)]
    sequences = [e.with_context for e in encoded] + [e.without_context for e in encoded]
    sequences.sort(key=len)
    for start in range(0, len(sequences), batch_size):
        ids, mask, positions, _ = pad_batch(
            sequences[start : start + batch_size], loaded.tokenizer.pad_token_id, "right", loaded.device
        )
        with torch.inference_mode():
            loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)


def _sync(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def timed(loaded: LoadedModel, work: object) -> float:
    _sync(loaded)
    start = time.perf_counter()
    work()  # type: ignore[operator]
    _sync(loaded)
    return time.perf_counter() - start


def random_model(template_dir: Path, folder: Path, dtype: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(template_dir)
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), **QWEN25_15B)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--facts", type=Path, default=None, help="default: the demo edit facts")
    parser.add_argument("--count", type=int, default=64, help="facts to capture")
    parser.add_argument("--seed-count", type=int, default=16, help="facts for the (slow) seed's way")
    parser.add_argument("--layer", type=int, default=None, help="default: the last layer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--random-config", choices=["qwen2.5-1.5b"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.model is None or args.facts is None:
        from qfedit.demo import DEMO_MODEL_DIR, EDITS_PATH

        args.model = args.model or DEMO_MODEL_DIR
        args.facts = args.facts or EDITS_PATH

    # The seed's way passes `past_key_values`, which transformers 5 renames; the warning is noise here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.random_config:
            model_dir = random_model(args.model, Path(tmp) / "model", args.dtype)
        loaded = load_model(model_dir, dtype=args.dtype, device=args.device)
        layer = args.layer if args.layer is not None else loaded.num_layers - 1
        facts = read_jsonl(args.facts)[: args.count]
        few = facts[: args.seed_count]
        options = CaptureOptions(batch_size=args.batch_size)
        capture(loaded, facts[:4], layer, options=options)  # warm-up

        batched = timed(loaded, lambda: capture(loaded, facts, layer, options=options))
        plain = timed(loaded, lambda: plain_forward(loaded, facts, args.batch_size))
        folder, uncached_folder = Path(tmp) / "seed", Path(tmp) / "seed-no-cache"
        folder.mkdir()
        uncached_folder.mkdir()
        seed = timed(loaded, lambda: seed_way(loaded, few, layer, folder))
        uncached = timed(loaded, lambda: seed_way(loaded, few, layer, uncached_folder, kv_cache=False))

    rates = {
        "batched capture": len(facts) / batched,
        "plain forward": len(facts) / plain,
        "seed's way": len(few) / seed,
        "seed's way, no KV cache": len(few) / uncached,
    }
    seed_rate, plain_rate = rates["seed's way"], rates["plain forward"]
    table = Table(title=f"capture throughput, {loaded.path.name}, layer {layer}, {args.device}, {args.dtype}")
    for column in ("method", "facts", "seconds", "facts/s", "vs seed's way", "vs plain forward"):
        table.add_column(column, justify="right")
    for name, facts_n, seconds in (
        ("batched capture", len(facts), batched),
        ("plain forward", len(facts), plain),
        ("seed's way", len(few), seed),
        ("seed's way, no KV cache", len(few), uncached),
    ):
        rate = rates[name]
        table.add_row(
            name,
            str(facts_n),
            f"{seconds:.3f}",
            f"{rate:.1f}",
            f"{rate / seed_rate:.1f}x",
            f"{rate / plain_rate:.2f}x",
        )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
