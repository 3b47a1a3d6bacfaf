"""Architecture is data: where QF finds a layer's MLP in each supported model family.

QF needs, for decoder layer `l`: the module whose *input* is the residual stream entering the MLP
block (the pre-MLP norm, so `h` is read before normalisation), and the output projection of the
MLP (`down_proj`), whose input is the key `k` and whose weight `W` is edited.
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

    def to_parameter_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A `(d, m)` update in the layout of the stored parameter."""
        return delta.T.contiguous() if self.transposed else delta


def _llama_like(family: str) -> Architecture:
    return Architecture(
        family, layers="model.layers", residual_norm="post_attention_layernorm", down_proj="mlp.down_proj"
    )


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    # Gemma 1 only: Gemma 2/3 normalise the MLP output before adding it to the residual, which
    # breaks the linear relation `out = h + W k` that the solve relies on.
    "gemma": _llama_like("gemma"),
    "phi3": _llama_like("phi3"),
    "gpt2": Architecture(
        "gpt2", layers="transformer.h", residual_norm="ln_2", down_proj="mlp.c_proj", transposed=True
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
