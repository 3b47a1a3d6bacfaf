"""The part of a target the next token sees: QF's error restricted to the logit directions of the
tokens that compete at each position.

QF asks the edited layer to move the residual stream without the fact to where it is with the fact.
At the top layer that difference is large (the fact in the system message shifts the whole state)
and mostly invisible to the next token: what the next token sees of a residual `r` is its logits,
`U N(r)`, and of those only the few likely ones matter. With `k` rivals per position (the `k`
likeliest tokens with the fact and the `k` likeliest without it), the error is projected on the span
of `g * (u_j - u_t)`: the directions whose inner product with `r` are the logit gaps between rival
`j` and the target token `t` (`g` the final norm's gain). The projection keeps every such gap the
teacher has, and drops the rest of the difference, which the edit would otherwise write into keys
that other questions share. This is the logit lens: exact at the last layer, an approximation below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn

from qfedit.modeling import LoadedModel

_F64 = torch.float64
_CHUNK = 256


def _final_norm(loaded: LoadedModel) -> nn.Module:
    return loaded.model.get_submodule(loaded.architecture.final_norm)


def _unembedding(loaded: LoadedModel) -> torch.Tensor:
    """The output embedding `U` (vocabulary x d)."""
    head = cast(Callable[[], nn.Module], loaded.model.get_output_embeddings)()
    return cast(torch.Tensor, head.weight).detach()


def _gain(loaded: LoadedModel) -> tuple[torch.Tensor, bool]:
    """The final norm's gain `g` (d,), and whether it centres `r` first (LayerNorm)."""
    norm = _final_norm(loaded)
    if isinstance(norm, nn.LayerNorm):
        return norm.weight.detach().to(_F64), True
    # An RMSNorm of a vector of ones is its gain (however the family stores it: Gemma's `1 + w`).
    unembed = _unembedding(loaded)
    with torch.inference_mode():
        ones = torch.ones(1, unembed.shape[1], dtype=unembed.dtype, device=unembed.device)
        return norm(ones)[0].detach().to(_F64), False


def _lens_logits(loaded: LoadedModel, outputs: torch.Tensor) -> Iterator[torch.Tensor]:
    """The logits the top layer's output `outputs` (n, d) gives (logit lens: the final norm, then
    the output embedding), `_CHUNK` rows at a time, on the model's device."""
    norm = _final_norm(loaded)
    unembed = _unembedding(loaded)
    for start in range(0, outputs.shape[0], _CHUNK):
        # Not held across the `yield`: grad modes are per thread, and a suspended generator's
        # `with` leaked inference mode into its caller (two zipped ones restored each other's).
        with torch.inference_mode():
            r = outputs[start : start + _CHUNK].to(device=loaded.device, dtype=unembed.dtype)
            logits = norm(r) @ unembed.T
        yield logits


def rivals(
    loaded: LoadedModel, outputs_with: torch.Tensor, outputs_without: torch.Tensor, k: int
) -> torch.Tensor:
    """`(n, 2k)` token ids: at each position, the `k` likeliest next tokens read from the top
    layer's output with the fact and the `k` likeliest without it."""
    found = [
        torch.cat([with_.topk(k, dim=-1).indices, without.topk(k, dim=-1).indices], dim=-1).cpu()
        for with_, without in zip(
            _lens_logits(loaded, outputs_with), _lens_logits(loaded, outputs_without), strict=True
        )
    ]
    return torch.cat(found) if found else torch.zeros(0, 2 * k, dtype=torch.long)


def settled(loaded: LoadedModel, outputs: torch.Tensor, tokens: torch.Tensor, margin: float) -> torch.Tensor:
    """`(n,)` bool: the positions where the top layer's output `outputs` already gives the taught
    token `tokens` the highest logit, ahead of every other token by at least `margin` (logit lens,
    exact at the last layer)."""
    found = []
    for start, chunk in zip(range(0, outputs.shape[0], _CHUNK), _lens_logits(loaded, outputs), strict=True):
        logits = chunk.float()
        taught = tokens[start : start + _CHUNK].to(logits.device)[:, None]
        own = logits.gather(1, taught)[:, 0]
        best_other = logits.scatter(1, taught, float("-inf")).amax(dim=-1)
        found.append((own - best_other >= margin).cpu())
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.bool)


def project(
    loaded: LoadedModel, errors: torch.Tensor, tokens: torch.Tensor, rival: torch.Tensor
) -> torch.Tensor:
    """`errors` (n, d) projected, row by row, on the logit-gap directions of its rivals against its
    target token (see the module's docstring); float64."""
    gain, centred = _gain(loaded)
    unembed = _unembedding(loaded)
    out = torch.empty_like(errors, dtype=_F64)
    for start in range(0, errors.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        u_rival = unembed[rival[rows].to(unembed.device)].to(_F64).cpu()  # (c, 2k, d)
        u_target = unembed[tokens[rows].to(unembed.device)].to(_F64).cpu()  # (c, d)
        directions = gain * (u_rival - u_target[:, None, :])
        if centred:
            directions = directions - directions.mean(dim=-1, keepdim=True)
        _, values, basis = torch.linalg.svd(directions, full_matrices=False)  # basis (c, 2k, d)
        # A rival that is the target, or repeated, gives no direction: cut below the float64 floor.
        kept = values > values.amax(dim=-1, keepdim=True) * 1e-9
        basis = basis * kept[..., None]
        e = errors[rows].to(_F64)
        out[rows] = torch.einsum("crd,cr->cd", basis, torch.einsum("crd,cd->cr", basis, e))
    return out
