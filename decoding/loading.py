"""From a model spec to weights on a device: HF safetensors or the quantized file, oneDNN packing
of dense linears, quantizing a dense model (tests), the device and dtype choice, and load_model,
which returns the LoadedModel (transformer, tokenizer, stop tokens) the engine runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from decoding import kv_quant
from decoding.loaded_model import LoadedModel
from decoding.quant import QUANT_FORMAT, QuantEmbedding, QuantizedState, QuantLinear, QuantWeight, native_quant
from decoding.transformer import ModelArgs, Transformer


class PackedLinear(nn.Module):
    """nn.Linear whose weight is reordered once into oneDNN's blocked layout (CPU, bf16).

    torch reorders a plain weight on every call; with the decode step's 2-6 rows that made the
    1.5B model's GEMMs read its weights at ~15 GB/s, prepacked ~21-30 GB/s (measured on this CPU).
    The kernel is the same, so outputs are bit-identical to F.linear's.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 2) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: Transformer) -> Transformer:
    """Swap every linear for a PackedLinear where oneDNN takes it (CPU bf16); a no-op elsewhere."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return model
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, PackedLinear(child))
    return model


def _fuse(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF parameter names -> this module's fused layout."""
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state["model.embed_tokens.weight"] if args.tie_embeddings else state["lm_head.weight"]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.qkv.weight"] = torch.cat(
            [state[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        if args.qkv_bias:
            out[f"layers.{i}.qkv.bias"] = torch.cat([state[p + f"self_attn.{n}_proj.bias"] for n in ("q", "k", "v")])
        out[f"layers.{i}.o_proj.weight"] = state[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.gate_up.weight"] = torch.cat(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
        )
        out[f"layers.{i}.down.weight"] = state[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"layers.{i}.mlp_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    return out


def load_transformer(directory: Path, dtype: torch.dtype, device: str = "cpu") -> Transformer:
    """Load config.json + *.safetensors (Hugging Face names) from a model directory."""
    config = json.loads((directory / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    state: dict[str, torch.Tensor] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    for file in files:
        state.update(load_file(str(file)))
    with torch.device("meta"):
        model = Transformer(args)
    fused = {k: v.to(dtype) for k, v in _fuse(state, args).items()}
    model.load_state_dict(fused, assign=True, strict=True)
    model.inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    return pack_linears(model.to(device).eval())


def transformer_from_hf_model(hf_model: nn.Module, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the engine's model from an in-memory transformers model (tests use tiny random ones)."""
    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    model.load_state_dict({k: v.to(dtype) for k, v in _fuse(state, args).items()}, assign=True, strict=True)
    model.inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    return pack_linears(model.eval())


QUANT_FILE = "model.quant"  # safetensors of the kernel layout; not *.safetensors, which dense loaders glob


def save_quantized(state: QuantizedState, path: Path, quant_format: int) -> None:
    from safetensors.torch import save_file

    tensors, layout = state.to_tensors()
    meta = {"format": str(quant_format), "layout": json.dumps(layout), "tied_lm_head": str(state.tied_lm_head)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def quantized_format(directory: Path) -> int | None:
    """The layout version of a model directory's quantized weights, None when it has none."""
    from safetensors import safe_open

    path = directory / QUANT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as handle:
        return int((handle.metadata() or {}).get("format", 0))


def load_quantized_state(directory: Path) -> QuantizedState:
    from safetensors import safe_open

    path = directory / QUANT_FILE
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    return QuantizedState.from_tensors(load_file(str(path)), json.loads(meta["layout"]),
                                       meta.get("tied_lm_head") == "True")


def check_quantized_state(args: ModelArgs, state: QuantizedState) -> None:
    """Raise ValueError, naming the tensor, where quantized weights disagree with the config: the
    kernels take their sizes from the weights and the activations, so a mismatch must stop here."""
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    linears = {"embed": (args.vocab_size, args.dim)}
    if not state.tied_lm_head:
        linears["lm_head"] = (args.vocab_size, args.dim)
    dense = {"norm.weight": args.dim}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        linears |= {p + "qkv": (qkv, args.dim), p + "o_proj": (args.dim, args.n_heads * args.head_dim),
                    p + "gate_up": (2 * args.intermediate_size, args.dim),
                    p + "down": (args.dim, args.intermediate_size)}
        dense |= {p + "attn_norm.weight": args.dim, p + "mlp_norm.weight": args.dim}
        if args.qkv_bias:
            dense[p + "qkv.bias"] = qkv
    extra = sorted(set(state.linears) - set(linears)) + sorted(set(state.dense) - set(dense))
    if extra:
        raise ValueError(f"quantized weights hold {extra[0]}, which the config has no place for")
    for name, (n, k) in linears.items():
        parts = state.linears.get(name)
        if not parts:
            raise ValueError(f"quantized weights lack {name}")
        for i, w in enumerate(parts):
            w.check(f"{name}.{i}")
            if w.k != k:
                raise ValueError(f"{name}.{i}: takes {w.k} inputs, the config gives {k}")
        if sum(w.n for w in parts) != n:
            raise ValueError(f"{name}: {sum(w.n for w in parts)} outputs, the config gives {n}")
    for name, size in dense.items():
        t = state.dense.get(name)
        if t is None or tuple(t.shape) != (size,):
            raise ValueError(f"{name}: expected ({size},), found {'missing' if t is None else tuple(t.shape)}")


def transformer_from_quantized(args: ModelArgs, state: QuantizedState, dtype: torch.dtype) -> Transformer:
    """The engine's model on quantized weights (CPU): QuantLinear everywhere, the embedding table
    kept quantized and dequantized row by row on lookup."""
    check_quantized_state(args, state)
    with torch.device("meta"):
        model = Transformer(args)
    linears = state.linears
    model.embed = QuantEmbedding(linears["embed"][0], dtype)
    lm_head = linears["embed"] if state.tied_lm_head else linears["lm_head"]
    model.lm_head = QuantLinear(lm_head, None, out_dtype=torch.float32)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        layer.qkv = QuantLinear(linears[p + "qkv"], state.dense.get(p + "qkv.bias"))
        layer.o_proj = QuantLinear(linears[p + "o_proj"], None)
        layer.gate_up = QuantLinear(linears[p + "gate_up"], None)
        layer.down = QuantLinear(linears[p + "down"], None)
    norms = {k: v.to(dtype) for k, v in state.dense.items() if k.endswith("norm.weight")}
    model.load_state_dict(norms, assign=True, strict=False)
    model.inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise ValueError("quantized weights do not cover the model")
    # Row-invariant kernel: a decode step needs no padding row. Without it, the dequantizing
    # fallback runs dense GEMMs, which need the padding like the dense engine.
    model.min_rows = 1 if native_quant() is not None else 2
    return model.eval()


def load_quantized(directory: Path, dtype: torch.dtype) -> Transformer:
    """Load config.json + the quantized weights (QUANT_FILE) from a model directory (CPU)."""
    config = json.loads((directory / "config.json").read_text())
    return transformer_from_quantized(ModelArgs.from_hf_config(config), load_quantized_state(directory), dtype)


def quantize_transformer(model: Transformer, kinds: dict[str, int] | None = None,
                         dtype: torch.dtype | None = None) -> Transformer:
    """A dense model's weights rounded into the kernel layout (tests: tiny models get a quantized
    twin; real models read their values from the GGUF instead). kinds maps a module suffix
    (qkv, o_proj, gate_up, down, embed, lm_head) to 4, 5, 6 or 8; the default is 4. dtype: of the
    activations, norms and KV cache (default: the dense model's)."""
    return transformer_from_quantized(model.args, quantized_state(model, kinds), dtype or model.dtype)


def quantized_state(model: Transformer, kinds: dict[str, int] | None = None) -> QuantizedState:
    """quantize_transformer's weights, before they become a model."""
    from decoding.quant import quantize

    kinds = kinds or {}

    def q(name: str, weight: torch.Tensor) -> list[QuantWeight]:
        return [quantize(weight, kinds.get(name.rsplit(".", 1)[-1], 4))]

    def dense_weight(module: nn.Module) -> torch.Tensor:
        if isinstance(module, PackedLinear):
            raise ValueError("quantize_transformer needs plain nn.Linear weights (an fp32 model)")
        return module.weight

    linears = {"embed": q("embed", model.embed.weight), "lm_head": q("lm_head", dense_weight(model.lm_head))}
    dense: dict[str, torch.Tensor] = {"norm.weight": model.norm.weight.float()}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        for name in ("qkv", "o_proj", "gate_up", "down"):
            linears[p + name] = q(name, dense_weight(getattr(layer, name)))
        if layer.qkv.bias is not None:
            dense[p + "qkv.bias"] = layer.qkv.bias.float()
        dense[p + "attn_norm.weight"] = layer.attn_norm.weight.float()
        dense[p + "mlp_norm.weight"] = layer.mlp_norm.weight.float()
    return QuantizedState(linears, {k: v.detach().clone() for k, v in dense.items()}, tied_lm_head=False)



def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 ran 2-3x faster than fp32 here (memory-bound decode), where the CPU has bf16 units.
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


KV_DTYPES = ("auto", "q8", "bf16")  # --kv-dtype's choices


def pick_kv_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """What the KV cache stores, as load_model's kv_dtype: torch.uint8 for the 8-bit form, None for
    the model's own dtype. auto: 8-bit on a CPU (attention there reads half the bytes and takes
    integer dot products), the model's dtype elsewhere. bf16 names today's unquantized cache, which
    is in the model's dtype (bf16 where the CPU has bf16 units, fp32 where it has not)."""
    if requested not in KV_DTYPES:
        raise ValueError(f"unknown KV cache form {requested!r} (choose from {', '.join(KV_DTYPES)})")
    if requested == "q8" or (requested == "auto" and device.type == "cpu"):
        return kv_quant.STORAGE
    return None


def stop_ids_for(directory: Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    generation = directory / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(special)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return frozenset(ids)


def wants_quantized(requested_dtype: str, device: torch.device) -> bool:
    """The quantized CPU engine is the default; an explicit dtype (e.g. --dtype bf16) or a GPU
    keeps dense weights."""
    return requested_dtype == "auto" and device.type == "cpu"


def has_quantized_weights(directory: Path) -> bool:
    return (directory / QUANT_FILE).exists() and quantized_format(directory) == QUANT_FORMAT


def load_model(name: str, directory: Path, dtype: torch.dtype, device: torch.device,
               quantized: bool = False, kv_dtype: torch.dtype | None = None) -> LoadedModel:
    """quantized: use the directory's quantized weights when it has current ones (CPU only);
    activations and norms stay in `dtype`. kv_dtype: what the KV cache stores (None: `dtype`;
    torch.uint8: the 8-bit form, decoding/kv_quant.py)."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if quantized and device.type == "cpu" and has_quantized_weights(directory):
        model, weights = load_quantized(directory, dtype), "quantized"
    else:
        model, weights = load_transformer(directory, dtype, str(device)), "dense"
    model.kv_dtype = kv_dtype
    return LoadedModel(name, directory, model, tokenizer, stop_ids_for(directory, tokenizer), weights)
