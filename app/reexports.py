"""The deliberate re-exports of decoding/ and retrieval/ for ui/ and bench/, which import only app/.

ui/ and bench/ stand above app/; what they need from the two lower floors comes through this one
module, so every such dependency is listed here and nowhere else:
- data types the UI shows: Stats, Citation, DocumentInfo, Reading; errors it reports
  (RetrievalError); the index an upload goes into (HybridIndex) and the readable file types
  (supported_extensions); the method table (METHODS) and DecodingSettings; a cited page rendered
  with its excerpt marked (kept_file, pdf_page_image, surrounding_text).
- what the decoding benchmarks time or build, below the pipeline: the model and its loader
  (LoadedModel, Prompt, Transformer, load_model, PREFILL_CHUNK, transformer_module - the forward
  pass's module, whose attention_for bench.prefill_depth wraps to time attention), the generation
  loop (generate, run_to_end, BASELINE, Drafting), the kernels and layouts (native_attention,
  native_quant, PackedLinear, QuantLinear, QuantWeight, QuantEmbedding, quantized_bytes, the 8-bit
  K/V form quantize_kv) and which
  engine and kernels run (engine_description); the kernels' builder (build_library, kernel_flags,
  kernel_cache_dir, KernelUnavailable), which bench.dot_rate uses for its own probe.
- what the retrieval benchmark measures: read_document, Embedder, HybridIndex, RetrievalSettings,
  Label, load_labels, recall_at_k.
"""

from __future__ import annotations

from decoding import transformer as transformer_module
from decoding.attention import native_attention
from decoding.engine_info import engine_description
from decoding.generate import generate, run_to_end
from decoding.kv_quant import quantize as quantize_kv
from decoding.loaded_model import LoadedModel, Prompt
from decoding.loading import PackedLinear, load_model
from decoding.methods import BASELINE, METHODS, Drafting
from decoding.native import KernelUnavailable, build_library, kernel_cache_dir, kernel_flags
from decoding.quant import QuantEmbedding, QuantLinear, QuantWeight, native_quant, quantized_bytes
from decoding.settings import DecodingSettings
from decoding.stats import Stats
from decoding.transformer import PREFILL_CHUNK, Transformer
from retrieval.embedding import Embedder
from retrieval.errors import RetrievalError
from retrieval.index import HybridIndex
from retrieval.page_view import kept_file, pdf_page_image, surrounding_text
from retrieval.readers import read_document, supported_extensions
from retrieval.recall import Label, load_labels, recall_at_k
from retrieval.types import Citation, DocumentInfo, Reading, RetrievalSettings

__all__ = [
    "BASELINE",
    "METHODS",
    "PREFILL_CHUNK",
    "Citation",
    "DecodingSettings",
    "DocumentInfo",
    "Drafting",
    "Embedder",
    "HybridIndex",
    "KernelUnavailable",
    "Label",
    "LoadedModel",
    "PackedLinear",
    "Prompt",
    "QuantEmbedding",
    "QuantLinear",
    "QuantWeight",
    "Reading",
    "RetrievalError",
    "RetrievalSettings",
    "Stats",
    "Transformer",
    "build_library",
    "engine_description",
    "generate",
    "kept_file",
    "kernel_cache_dir",
    "kernel_flags",
    "load_labels",
    "load_model",
    "native_attention",
    "native_quant",
    "pdf_page_image",
    "quantize_kv",
    "quantized_bytes",
    "read_document",
    "recall_at_k",
    "run_to_end",
    "supported_extensions",
    "surrounding_text",
    "transformer_module",
]
