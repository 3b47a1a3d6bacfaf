"""Architecture is data: where QF finds a layer's MLP in each supported model family.

QF needs, for decoder layer `l`: the module whose *input* is the residual stream entering the MLP
block (the pre-MLP norm, so `h` is read before normalisation), and the output projection of the
MLP (`down_proj`), whose input is the key `k` and whose weight `W` is edited. Where the layer
normalises the MLP's output before adding it to the residual (Gemma 2/3), the block's output is
`h + N(W k)`, not `h + W k`, and the table names that norm too (`OutputNorm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qfedit.errors import InvalidInputError


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str
    """Path of the list of decoder layers from the top model."""
    residual_norm: str
    """Path, inside a layer, of the norm whose input is the residual entering the MLP block."""
    down_proj: str
    """Path, inside a layer, of the MLP output projection."""
    transposed: bool = False
    """True when the weight is stored `(m, d)` (GPT-2's Conv1D) instead of `(d, m)`."""
    post_mlp_norm: str | None = None
    """Path, inside a layer, of the RMSNorm applied to the MLP's output before the residual add."""
    norm_gain_offset: float = 0.0
    """The post-MLP norm's gain is `norm_gain_offset + weight` (Gemma stores `gain - 1`)."""
    final_norm: str = "model.norm"
    """Path, from the top model, of the norm before the output embedding (`qfedit.span`)."""

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        layers = model.get_submodule(self.layers)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.family}: {self.layers} is {type(layers).__name__}, not a ModuleList")
        return layers

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_list(model))

    def check_layer(self, model: nn.Module, layer: int) -> None:
        count = self.num_layers(model)
        if not 0 <= layer < count:
            raise InvalidInputError(f"layer {layer} is out of range: the model has layers 0..{count - 1}")

    def down_proj_name(self, layer: int) -> str:
        """Parameter name of the edited weight, as in the model's state dict."""
        return f"{self.layers}.{layer}.{self.down_proj}.weight"

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.layers}.{layer}.{self.down_proj}")

    def residual_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(f"{self.layers}.{layer}.{self.residual_norm}")

    def down_proj_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited weight as `W` (d x m), a view of the parameter (transposed for Conv1D)."""
        weight = model.get_parameter(self.down_proj_name(layer))
        return weight.T if self.transposed else weight

    def output_norm(self, model: nn.Module, layer: int) -> OutputNorm | None:
        """The norm between the layer's `down_proj` and the residual add, or None when there is none."""
        if self.post_mlp_norm is None:
            return None
        module = model.get_submodule(f"{self.layers}.{layer}.{self.post_mlp_norm}")
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        weight = getattr(module, "weight", None)
        if not isinstance(eps, float) or not isinstance(weight, torch.Tensor):
            raise TypeError(f"{self.family}: {self.post_mlp_norm} is not an RMSNorm with a weight and eps")
        gain = weight.detach().to(torch.float64) + self.norm_gain_offset
        return OutputNorm(gain=gain, eps=eps)

    def to_parameter_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A `(d, m)` update in the layout of the stored parameter."""
        return delta.T.contiguous() if self.transposed else delta


@dataclass(frozen=True)
class OutputNorm:
    """An RMSNorm on the MLP's output, `N(z) = g * z / sqrt(mean(z^2) + eps)`: the block outputs
    `h + N(W k)`.

    QF's target for the block is then a target `t` for `N(W' y)`. `N` keeps only a direction, and
    its outputs lie on the ellipsoid `{g * r : mean(r^2) = 1}` (up to `eps`): `preimage` gives a
    `down_proj` output `u` whose `N(u)` is the point of it nearest to `t`, which is `t` itself when
    `t` is on it."""

    gain: torch.Tensor  # (d,) float64
    eps: float

    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        """`N(z)` of each row, (n, d) float64."""
        z = outputs.to(torch.float64)
        return self.gain.to(z.device) * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps)

    def preimage(self, targets: torch.Tensor, like: torch.Tensor, steps: int = 100) -> torch.Tensor:
        """`u` (n, d) with `rms(u) = rms(like)` and `N(u)` nearest to each row of `targets`.

        At scale `s = rms(u)`, `N(u) = g * r` with `r = u / sqrt(s^2 + eps)`, so `N` reaches the
        ellipsoid `mean(r^2) = c^2`, `c = s / sqrt(s^2 + eps)`; the scale is taken from `like` (the
        current output `W y`), which keeps the change of `W` small. The point of the ellipsoid
        nearest to `t` is `r_i = g_i t_i / (g_i^2 + mu)`, with the multiplier `mu > -min(g^2)` at
        which `mean(r^2) = c^2`, found by bisection (`mean(r^2)` falls as `mu` grows); `t` itself,
        `mu = 0`, when `t` is on it."""
        t = targets.to(torch.float64)
        gain = self.gain.to(t.device)
        d = t.shape[-1]
        scale = like.to(torch.float64).pow(2).mean(-1, keepdim=True).sqrt()  # (n, 1)
        scale = torch.where(scale > 0, scale, 1.0)
        radius = scale / (scale.pow(2) + self.eps).sqrt()  # (n, 1) c
        g2, gt = gain.pow(2), gain * t  # (d,), (n, d)
        low = torch.full_like(radius, -float(g2.min()))
        # At `mu = |g t| / (c sqrt(d))`, mean(r^2) <= |g t|^2 / (d mu^2) = c^2: the root is below.
        high = torch.maximum(gt.norm(dim=-1, keepdim=True) / (radius * d**0.5), low)
        tiny = torch.finfo(torch.float64).tiny

        def nearest(mu: torch.Tensor) -> torch.Tensor:
            denominator = g2 + mu
            return torch.where(denominator > 0, gt / denominator.clamp(min=tiny), 0.0)

        for _ in range(steps):
            middle = (low + high) / 2
            over = nearest(middle).pow(2).mean(-1, keepdim=True) > radius.pow(2)
            low, high = torch.where(over, middle, low), torch.where(over, high, middle)
        r = nearest(high)
        rms = r.pow(2).mean(-1, keepdim=True).sqrt()
        # `u = s r / c` exactly when `mean(r^2) = c^2`; rescaled, so a degenerate root keeps `s`.
        return torch.where(rms > 0, scale * r / rms.clamp(min=tiny), 0.0)


def _llama_like(family: str) -> Architecture:
    return Architecture(
        family, layers="model.layers", residual_norm="post_attention_layernorm", down_proj="mlp.down_proj"
    )


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "gemma": _llama_like("gemma"),
    # A Gemma 3 text model (what a Gemma 3 GGUF file converts to); "gemma3", the multimodal
    # checkpoint, loads as an image-text model with its layers elsewhere and is not supported.
    "gemma3_text": Architecture(
        "gemma3_text",
        layers="model.layers",
        residual_norm="pre_feedforward_layernorm",
        down_proj="mlp.down_proj",
        post_mlp_norm="post_feedforward_layernorm",
        norm_gain_offset=1.0,
    ),
    "phi3": _llama_like("phi3"),
    "gpt2": Architecture(
        "gpt2",
        layers="transformer.h",
        residual_norm="ln_2",
        down_proj="mlp.c_proj",
        transposed=True,
        final_norm="transformer.ln_f",
    ),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise InvalidInputError(
            f"unsupported model architecture {model_type!r}; supported: {supported}"
        ) from None
