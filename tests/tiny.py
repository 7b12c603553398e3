"""Tiny randomly initialised llama-family models for fast, exact tests of the decoding logic."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from decoding.loaded_model import LoadedModel, Prompt
from decoding.loading import transformer_from_hf_model

VOCAB = 256
# A small vocabulary makes n-grams recur, so prompt lookup finds drafts (the exactness suites' models).
EXACT_VOCAB = 32


class ByteTokenizer:
    """Stands in for a real tokenizer: token id = byte value."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text: str, add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": self.encode(text)}
        if return_offsets_mapping:  # every byte of a character spans that character
            out["offset_mapping"] = [(i, i + 1) for i, char in enumerate(text) for _ in char.encode("utf-8")]
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(VOCAB)}


def tiny_model(seed: int, dtype: torch.dtype = torch.float32, layers: int = 2, noise_from: int | None = None,
               noise: float = 0.0, stop_ids: frozenset[int] = frozenset(), vocab: int = VOCAB,
               attention_gain: float = 1.0, max_positions: int = 4096,
               kv_dtype: torch.dtype | None = None) -> LoadedModel:
    """A tiny Qwen2; with noise_from, a perturbed copy of that seed's model (a drafter that mostly agrees).
    kv_dtype: what its caches store (None: its dtype; torch.uint8: the 8-bit form).

    attention_gain < 1 weakens attention's output, so the next token depends mostly on the last one
    and greedy answers fall into loops: prompt-lookup drafting then has something to find.
    """
    # head_dim 64: a size the C attention kernel takes, so these tests run the production path.
    config = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         rope_theta=10000.0)
    torch.manual_seed(seed if noise_from is None else noise_from)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # sharper distributions than the default init, so greedy choices are stable
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.mul_(attention_gain)
        if noise_from is not None:
            gen = torch.Generator().manual_seed(seed)
            for p in hf.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen) * p.std())
    model = transformer_from_hf_model(hf, dtype)
    model.kv_dtype = kv_dtype
    return LoadedModel(f"tiny-{seed}", None, model, ByteTokenizer(), stop_ids)


# The exactness suites' (activation dtype, KV form) pairs: each float dtype with its own KV and with 8-bit KV.
EXACT_FORMS = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.uint8),
               (torch.bfloat16, torch.uint8)]
EXACT_FORM_IDS = ["fp32", "bf16", "fp32-kv8", "bf16-kv8"]


def random_prompt(length: int, seed: int, vocab: int = VOCAB) -> Prompt:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
    cut = max(1, length - 8)
    # One header token, then the documents as one piece (a focus drafter keeps the header).
    return Prompt(ids[:cut], ids[cut:], (1,) if cut > 1 else ())
