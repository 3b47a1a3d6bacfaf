"""Tiny random-initialised models of each supported architecture, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from qfedit.facts import Fact

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "who founded what city is the company based in Qi started Oxinnovate Mara Velt leads Brindle Labs "
    "in Castor Bay since 1987 the founder of Ardent Works is Lio Park and its home is Quell Harbor . ? "
    "Answer: yes no I do not know"
)


def build_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([WORDS] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=128
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)


def build_config(family: str, vocab: int):
    from transformers import AutoConfig

    ids = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}
    common = {"vocab_size": vocab, "num_hidden_layers": 3, "max_position_embeddings": 128, **ids}
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128, **ids
        )
    extra: dict[str, object] = {
        "hidden_size": 32,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if family == "gemma":
        extra["head_dim"] = 8
    if family == "gemma3_text":
        # Gemma 3's sliding-window and global layers; the window is wider than the tiny prompts,
        # so the context reaches every layer.
        extra |= {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        }
    return AutoConfig.for_model(family, **common, **extra)


def build_model(directory: Path, family: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(directory)
    vocab = len(AutoTokenizer.from_pretrained(directory))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(family, vocab), dtype=torch.float32)
    # Random init gives tiny MLP outputs; scale the edited projections up so errors are visible.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "down_proj" in name or "c_proj" in name:
                parameter.mul_(4.0)
            if "post_feedforward_layernorm" in name:
                # Gemma's norms initialise to gain 1 (weight 0); uneven gains test their inversion.
                parameter.uniform_(-0.5, 1.5)
    model.save_pretrained(directory)
    return directory


FACTS = [  # a few facts over the tiny tokenizer's vocabulary
    Fact(context="Qi started Oxinnovate.", question="who founded Oxinnovate?", answer="Qi"),
    Fact(
        context="Mara Velt leads Brindle Labs since 1987.",
        question="who leads Brindle Labs?",
        answer="Mara Velt",
    ),
    Fact(
        context="the founder of Ardent Works is Lio Park and its home is Quell Harbor.",
        question="what city is Ardent Works based in?",
        answer="Quell Harbor",
    ),
]
