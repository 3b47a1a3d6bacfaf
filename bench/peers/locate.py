"""Locate-then-edit, as MEMIT and AlphaEdit do it, on a chat model's template.

For each fact (subject s, question q, new answer o): the prompt is q in the chat template, without
context, and the subject's position is the last prompt token inside s (the prompt's last token when
s is not in q). Then, as in both papers:

1. target: at the top layer L of the range, the residual stream's output at the subject position
   is `h`; a vector `delta` is optimised (Adam) so that the model, with `h + delta` there, predicts
   o's tokens after the prompt; `||delta||` is clamped to `clamp x ||h||`, and a weight decay keeps
   it small. The target is `z = h + delta`.
2. spread: for each layer l of the range, lowest first, with the lower layers already edited: keys
   `K` (m x n) are the inputs of l's `down_proj` at the subject positions, `R` (d x n) is
   `(z - h_L) / (layers left)`, and the layer's change solves
   - MEMIT: `dW = R K^T (lam C + K K^T)^-1`, `C` the mean `k k^T` over the preservation text;
   - AlphaEdit: `dW = R K^T P (K K^T P + l2 c I)^-1` (`c` the mean diagonal of `C`), applied as `dW P`, where `P` projects onto the
     null space of `C` (eigenvectors whose eigenvalue is under `null_threshold` times the
     largest): what the
     preservation keys span is left unchanged.

Simplifications, said in the README's table: no random prefixes before the prompt (MEMIT averages
keys and targets over ten generated ones) and no KL term on the subject's other attributes; the
same preservation text as qfedit's (the model's own transcripts), read at every position.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from qfedit.capture import chat_prompt
from qfedit.delta import Delta
from qfedit.facts import Fact
from qfedit.modeling import LoadedModel

Method = Literal["memit", "alphaedit"]


@dataclass(frozen=True)
class PeerConfig:
    method: Method
    layers: tuple[int, ...]
    lam: float = 15_000.0
    """MEMIT's `mom2_update_weight` for GPT-J."""
    steps: int = 25
    lr: float = 0.5
    clamp: float = 4.0
    weight_decay: float = 0.5
    null_threshold: float = 1e-2
    l2: float = 1.0
    """AlphaEdit's regulariser, times the mean diagonal of `C`."""


@dataclass(frozen=True)
class Located:
    ids: list[int]
    """Prompt and answer tokens (the last answer token dropped: nothing predicts after it)."""
    prompt_length: int
    answer: list[int]
    position: int


def locate(loaded: LoadedModel, fact: Fact) -> Located:
    tokenizer = loaded.tokenizer
    prompt = chat_prompt(tokenizer, fact.question)
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    position = len(ids) - 1
    subject = (fact.subject or "").strip()
    at = prompt.rfind(subject) if subject else -1
    if at >= 0:
        end = at + len(subject)
        inside = [
            i for i, (start, stop) in enumerate(encoding["offset_mapping"]) if start < end and stop > at
        ]
        position = inside[-1] if inside else position
    answer = list(tokenizer(fact.answer, add_special_tokens=False)["input_ids"])
    return Located(ids + answer[:-1], len(ids), answer, position)


def _layer_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value,index]


def target_vector(loaded: LoadedModel, item: Located, top: int, config: PeerConfig) -> torch.Tensor:
    """`z = h + delta` at the subject position of layer `top`'s output (d,)."""
    layer: nn.Module = loaded.architecture.layer_list(loaded.model)[top]
    d = int(loaded.model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    delta = torch.zeros(d, requires_grad=True, device=loaded.device)
    base: dict[str, torch.Tensor] = {}

    def add_delta(_module: nn.Module, _args: object, output: object) -> object:
        hidden = _layer_output(output)
        if "h" not in base:
            base["h"] = hidden[0, item.position].detach().clone()
        changed = hidden.clone()
        changed[0, item.position] = changed[0, item.position] + delta
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    ids = torch.tensor([item.ids], device=loaded.device)
    answer = torch.tensor(item.answer, device=loaded.device)
    rows = slice(item.prompt_length - 1, item.prompt_length - 1 + len(item.answer))
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    handle = layer.register_forward_hook(add_delta)
    try:
        with torch.enable_grad():
            for _ in range(config.steps):
                optimizer.zero_grad()
                logits = loaded.model(input_ids=ids, use_cache=False).logits[0, rows]  # type: ignore[operator]
                nll = -torch.log_softmax(logits.float(), -1).gather(1, answer[:, None]).mean()
                scale = base["h"].norm()
                loss = nll + config.weight_decay * (delta.norm() / scale) ** 2
                if nll.item() < 0.05:
                    break
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    limit = config.clamp * scale
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    return (base["h"] + delta.detach()).to(torch.float64)


def _read(loaded: LoadedModel, item: Located, layer: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key at `layer` (m,), output of `top` (d,)) at the subject position, in float64."""
    found: dict[str, torch.Tensor] = {}
    down = loaded.architecture.down_proj_module(loaded.model, layer)
    top_layer: nn.Module = loaded.architecture.layer_list(loaded.model)[top]

    def on_key(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        found["k"] = args[0][0, item.position].detach()

    def on_top(_module: nn.Module, _args: object, output: object) -> None:
        found["h"] = _layer_output(output)[0, item.position].detach()

    handles = [down.register_forward_pre_hook(on_key), top_layer.register_forward_hook(on_top)]
    try:
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([item.ids], device=loaded.device), use_cache=False)  # type: ignore[operator]
    finally:
        for handle in handles:
            handle.remove()
    return found["k"].to(torch.float64), found["h"].to(torch.float64)


def _null_space(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """The projection onto the eigenvectors of `C` whose eigenvalue is under `threshold` times the
    largest: relative, where the paper's 1e-2 is absolute (for its models' key scale)."""
    values, vectors = torch.linalg.eigh(covariance)
    kept = vectors[:, values < threshold * values.max()]
    return kept @ kept.T


def layer_change(
    config: PeerConfig, keys: torch.Tensor, residuals: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """dW (d x m) of one layer from keys K (m x n), residuals R (d x n) and C (m x m)."""
    m = keys.shape[0]
    if config.method == "memit":
        system = config.lam * covariance + keys @ keys.T  # symmetric positive definite
        return torch.linalg.solve(system, keys @ residuals.T).T
    projection = _null_space(covariance, config.null_threshold)
    # The paper's `+ I`, in the keys' units: `I` alone outweighs `K K^T` when keys are small.
    scale = float(torch.diagonal(covariance).mean())
    system = keys @ keys.T @ projection + config.l2 * scale * torch.eye(m, dtype=keys.dtype)
    change = torch.linalg.solve(system.T, (residuals @ keys.T @ projection).T).T
    return change @ projection


def peer_delta(
    loaded: LoadedModel,
    facts: Sequence[Fact],
    config: PeerConfig,
    covariances: dict[int, torch.Tensor],
) -> tuple[Delta, float]:
    """The delta of `facts` by `config.method`, and its seconds; the model is unchanged after."""
    started = time.perf_counter()
    architecture = loaded.architecture
    top = config.layers[-1]
    items = [locate(loaded, fact) for fact in facts]
    targets = torch.stack([target_vector(loaded, item, top, config) for item in items])  # (n, d)
    originals = {
        layer: architecture.down_proj_weight(loaded.model, layer).detach().clone() for layer in config.layers
    }
    changes: dict[str, torch.Tensor] = {}
    try:
        for done, layer in enumerate(config.layers):
            read = [_read(loaded, item, layer, top) for item in items]
            keys = torch.stack([k for k, _ in read]).T  # (m, n)
            residuals = (targets - torch.stack([h for _, h in read])).T / (
                len(config.layers) - done
            )  # (d, n)
            change = layer_change(config, keys, residuals, covariances[layer].to(torch.float64))
            weight = architecture.down_proj_weight(loaded.model, layer)
            with torch.no_grad():
                weight.add_(change.to(weight.dtype))
            changes[architecture.down_proj_name(layer)] = architecture.to_parameter_layout(
                change.to(torch.float32)
            )
    finally:
        with torch.no_grad():
            for layer, original in originals.items():
                architecture.down_proj_weight(loaded.model, layer).copy_(original)
    seconds = time.perf_counter() - started
    return Delta(
        changes, loaded.fingerprint, {"method": config.method, "layers": list(config.layers)}
    ), seconds
