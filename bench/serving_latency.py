"""Generation latency per token with and without a version applied, and version switch time.

    python bench/serving_latency.py                                   # random Qwen2, CPU
    python bench/serving_latency.py --hidden 896 --intermediate 4864 --layers 24 --device cuda

A version is merged into the weights, so its rows should match the base's: the same kernels on
the same shapes. For contrast, a row applies the same update through a forward hook on each
edited `down_proj` (what a version would cost if it were not merged). Switch rows time
`VersionedModel.switch_to` between versions that edit one and two layers.

The model is a random Qwen2 of the given size built in memory (latency does not depend on what
the weights say), the updates random rank-8 matrices of the size QF writes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from qfedit.architectures import architecture_for
from qfedit.delta import Delta
from qfedit.modeling import LoadedModel, resolve_dtype
from qfedit.serving import VersionedModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _random_model(args: argparse.Namespace) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype))
    model.to(args.device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=None,
        architecture=architecture_for("qwen2"),
        fingerprint="bench",
        path=Path("<random>"),
    )


def _update(loaded: LoadedModel, layer: int, seed: int, rank: int = 8) -> tuple[str, torch.Tensor]:
    name = loaded.architecture.down_proj_name(layer)
    weight = loaded.model.get_parameter(name)
    generator = torch.Generator().manual_seed(seed)
    d, m = weight.shape
    low = torch.randn(d, rank, generator=generator) @ torch.randn(rank, m, generator=generator)
    return name, low * (1e-3 / rank)


@contextmanager
def _at(versioned: VersionedModel, delta: Delta | None) -> Iterator[None]:
    versioned.switch_to(delta, "bench@0" if delta is None else "bench@2")
    yield


@contextmanager
def _hooked(loaded: LoadedModel, delta: Delta) -> Iterator[None]:
    """The update added by forward hooks instead of merged: the cost merging avoids."""
    handles = []
    for name, change in delta.tensors.items():
        module = loaded.model.get_submodule(name.removesuffix(".weight"))
        update = change.to(device=loaded.device, dtype=next(module.parameters()).dtype)

        def add(
            _m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, u: torch.Tensor = update
        ) -> torch.Tensor:
            return out + inputs[0] @ u.T

        handles.append(module.register_forward_hook(add))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _generation_seconds(versioned: VersionedModel, ids: torch.Tensor, tokens: int) -> float:
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    with versioned.reading(), torch.inference_mode():
        versioned.loaded.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt", type=int, default=32, help="Prompt tokens.")
    parser.add_argument("--tokens", type=int, default=32, help="Generated tokens per run.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    loaded = _random_model(args)
    versioned = VersionedModel(loaded, base_label="bench@0")
    layer = args.layers // 2
    one = Delta(dict([_update(loaded, layer, 1)]), "bench")
    two = Delta(dict([_update(loaded, layer, 2), _update(loaded, layer + 1, 3)]), "bench")

    latency = Table(
        title=f"generation latency, Qwen2 d={args.hidden} m={args.intermediate} L={args.layers}, "
        f"{args.dtype} on {device}, {args.prompt}-token prompt, {args.tokens} new tokens, median of {args.repeats}"
    )
    for column in ("weights", "ms / token", "vs base"):
        latency.add_column(column, justify="right")
    ids = torch.randint(10, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "base (bench@0)": lambda: _at(versioned, None),
        "version applied (merged, 2 layers)": lambda: _at(versioned, two),
        "same update as hooks (contrast)": lambda: _hooked(loaded, two),
    }
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for repeat in range(args.repeats + 1):
        # Interleaved, so drift in a shared machine's load hits every condition alike.
        for name, condition in conditions.items():
            with condition():
                seconds = _generation_seconds(versioned, ids, args.tokens)
            if repeat:  # the first round warms allocator and kernels up
                times[name].append(seconds)
    base_ms = 1000 * statistics.median(times["base (bench@0)"]) / args.tokens
    for name, found in times.items():
        ms = 1000 * statistics.median(found) / args.tokens
        latency.add_row(name, f"{ms:.2f}", f"{ms / base_ms:.2f}x")

    switches = Table(title=f"switch time (down_proj {args.hidden} x {args.intermediate}, {args.dtype})")
    for column in ("switch", "tensors written", "ms"):
        switches.add_column(column, justify="right")
    paths: list[tuple[str, Delta | None, str, Delta | None]] = [
        ("bench@0", None, "bench@1", one),
        ("bench@1", one, "bench@2", two),
        ("bench@2", two, "bench@1", one),
        ("bench@1", one, "bench@0", None),
        ("bench@2", two, "bench@2", two),
    ]
    for start_label, start, end_label, end in paths:
        switch_times: list[float] = []
        written = 0
        for _ in range(args.repeats):
            versioned.switch_to(start, start_label)  # the starting version, untimed
            _sync(device)
            began = time.perf_counter()
            written = len(versioned.switch_to(end, end_label).written)
            _sync(device)
            switch_times.append(time.perf_counter() - began)
        switches.add_row(
            f"{start_label} -> {end_label}", str(written), f"{1000 * statistics.median(switch_times):.2f}"
        )

    console = Console()
    console.print(latency)
    console.print(switches)


if __name__ == "__main__":
    main()
