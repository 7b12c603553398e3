"""Decoding benchmark: every method on the same input, as ratios to LC measured in the same run.

    python -m bench.decode [--contexts 4096,8192,16384] [--runs 3] [--new-tokens 64] [--fast]

For each context length it builds one real input (a slice of data/R-data.pdf around the demo
question's answer, ingested as the product ingests a file: indexed with the real retriever, the
drafter's chunk KV and the target's KV of the documents computed), then every method answers the
question through the pipeline's own entry (app.pipeline.answer_once: the call the CLI makes, so
RAPID's drafter reads its passages from chunk KV), and it reports per method the median decode
tokens/s over runs, acceptance, mean accepted length, the speedup over LC, and the memory
bandwidth achieved (bytes read per target pass x passes/s) against a measured copy bandwidth, and
the process's peak resident memory while the method ran (both models stay loaded).
Side by side on the same prompt: transformers' own assisted generation (the same drafter as
`assistant_model`) and prompt-lookup decoding, timed on a prefilled cache so only decoding counts,
and llama.cpp on the GGUF files the models came from (bench/peers.py; `make peers` builds it).
It also times one target verify pass of gamma+1 tokens against one decode step, every KV form's in
turn (decode/verify ms per form, interleaved).

`--kv-dtypes bf16,q8` runs our methods once per KV cache form (each form has its own engine and
ingest), context by context, the forms answering each run of a method in turn, and reports
verify/decode per form; llama.cpp runs with its default
f16 cache and with Q8_0 keys and values (`--peer-caches`). Without it, one form: the settings'.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from app.config import Settings
from app.events import Done
from app.machine import machine_summary
from app.options import add_model_options, settings_from_args
from app.pipeline import Engine, answer_once
from app.reexports import (
    BASELINE,
    DecodingSettings,
    Drafting,
    HybridIndex,
    LoadedModel,
    QuantEmbedding,
    Transformer,
    engine_description,
    native_attention,
    quantized_bytes,
    read_document,
)
from app.reexports import METHODS as METHOD_TABLE
from app.registry import resolve_model
from bench.kv_fill import filled_cache
from bench.kv_forms import parse_kv_dtypes, settings_for
from bench.peers import PEER_CACHES, PEERS, find_llama_cpp, measure_peers

REPO = Path(__file__).resolve().parent.parent
# Bench-only variants, named by a suffix to the method: RAPID that first tries n-gram lookup drafts
# from its retrieved context, and a model drafter that scores the whole vocabulary (the default
# scores only the prompts' tokens), to measure what each choice is worth.
VARIANTS: dict[str, dict[str, bool]] = {"+lookup": {"lookup_in_rapid": True},
                                        "+all-tokens": {"draft_vocabulary": False}}
# Every method, LC first (the others are measured against it), then the variants of RAPID.
METHODS = (BASELINE, *(name for name in METHOD_TABLE if name != BASELINE),
           *(f"{m.name}{suffix}" for suffix in VARIANTS for m in METHOD_TABLE.values()
             if m.drafting is Drafting.RAG_MODEL and not m.drafter_is_target))
# The demo question's answer is one sentence (15-16 tokens): too few passes for stable speeds.
LONG_ANSWER_QUESTION = (
    "How does read.fwf read a file in fixed width format, what do its widths and sep arguments do, "
    "and what happens to the data on the way?"
)


def copy_bandwidth_gbs() -> float:
    """Bytes read per second by a large tensor copy (it also writes as much): a practical read ceiling."""
    src = torch.empty(256 * 1024 * 1024, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() * src.element_size() / min(times) / 1e9


def reset_peak_rss() -> bool:
    """Restart the process's peak resident memory (Linux: VmHWM), so each method gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gb() -> float | None:
    """Peak resident memory since the last reset (or the process's start), in GB; None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return kib * 1024 / 1e9 if kib is not None else None


def bytes_per_pass(model: Transformer, context_tokens: int) -> int:
    """Weights read per forward (all but the embedding table, of which one row is read) plus the KV cache."""
    a = model.args
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    per_layer = a.dim * (q_out + 2 * kv_out) + q_out * a.dim + 3 * a.dim * a.intermediate_size + 2 * a.dim
    if model.quantized:  # the kernel's own blocks (scales included); the embedding table is not read whole
        embedding = next(m for m in model.modules() if isinstance(m, QuantEmbedding))
        weights = quantized_bytes(model) - embedding.nbytes + (embedding.nbytes if model.args.tie_embeddings else 0)
    else:
        # Counted from the shapes: packed linears (decoding.loading.PackedLinear) are not parameters.
        weights = (a.n_layers * per_layer + a.vocab_size * a.dim + a.dim) * model.dtype.itemsize
    return weights + kv_bytes_per_token(model) * context_tokens


def kv_bytes_per_token(model: Transformer) -> int:
    """Bytes of K and V one token takes in the model's cache, in whatever form it stores (an 8-bit
    row holds its scales too), read off a cache of one slot."""
    cache = model.new_cache(1)
    return sum(t.element_size() * t.shape[0] * t.shape[2] for t in (*cache.keys, *cache.values))


def verify_over_decode(models: dict[str, Transformer], context_tokens: int, gamma: int,
                       repeats: int = 9) -> dict[str, tuple[float, float]]:
    """Per KV form, median seconds for one decode step and for one verify pass of gamma + 1 tokens at
    this cache length.

    Every repeat runs each form's decode step and verify pass in turn (the forms' order alternating),
    so a slow spell of the machine lands on every form and both passes alike: the forms' other rows
    run minutes apart, and this host's speed drifts by more than the forms differ.
    """
    caches = {form: filled_cache(model, context_tokens, context_tokens + gamma + 8) for form, model in models.items()}

    def step(form: str, n: int) -> float:
        cache = caches[form]
        start = time.perf_counter()
        models[form].forward(torch.full((n,), 100), cache, all_logits=n > 1)
        cache.crop(context_tokens)
        return time.perf_counter() - start

    for form in models:  # first touches of fresh buffers are not part of a step's cost
        step(form, 1), step(form, gamma + 1)
    times: dict[str, tuple[list[float], list[float]]] = {form: ([], []) for form in models}
    order = list(models)
    for repeat in range(repeats):
        for form in order if repeat % 2 == 0 else order[::-1]:
            times[form][0].append(step(form, 1))
            times[form][1].append(step(form, gamma + 1))
    return {form: (statistics.median(d), statistics.median(v)) for form, (d, v) in times.items()}


def document_slice(engine: Engine, n_tokens: int, workdir: Path) -> Path:
    """A text file of about n_tokens from data/R-data.pdf, centred on page 15 (the demo answer)."""
    target = engine.target
    limit = engine.settings.retrieval.max_file_bytes
    pages = [page.text for page in read_document(REPO / "data" / "R-data.pdf", limit)]
    ids = target.encode("\n\n".join(pages))
    answer_at = len(target.encode("\n\n".join(pages[:14])))
    start = max(0, min(answer_at - n_tokens // 2, len(ids) - n_tokens))
    doc = workdir / f"r-data-{n_tokens}.txt"
    doc.write_text(target.decode(ids[start : start + n_tokens]))
    return doc


def build_index(engine: Engine, n_tokens: int, workdir: Path) -> HybridIndex:
    """A real document slice of about n_tokens, ingested as the product ingests a file: indexed with
    the real retriever, then prepared (the drafter's chunk KV and the target's KV of the documents)."""
    index = engine.open_index(workdir / f"index-{n_tokens}")
    engine.ingest(index, [document_slice(engine, n_tokens, workdir)], progress=False)
    return index


def method_variant(method: str, decoding: DecodingSettings) -> tuple[str, DecodingSettings]:
    """A bench method name -> the method it runs and its settings (VARIANTS; a `+gN` suffix drafts
    N tokens per pass, so block lengths compare within one run: rapid+g7)."""
    if (sized := re.fullmatch(r"(.+)\+g(\d+)", method)) is not None:
        base, settings = method_variant(sized.group(1), decoding)
        return base, replace(settings, gamma=int(sized.group(2)))
    for suffix, overrides in VARIANTS.items():
        if method.endswith(suffix):
            base, settings = method_variant(method.removesuffix(suffix), decoding)
            return base, replace(settings, **overrides)
    return method, replace(decoding, method=method)


class _TokenClock:
    """A transformers streamer that notes when each batch of generated tokens came out."""

    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []  # (seconds, tokens in the batch); the prompt's put is skipped
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append((time.perf_counter(), value.numel()))

    def end(self) -> None:
        pass


def hf_baselines(target: LoadedModel, drafter: LoadedModel, prompt: list[int], new_tokens: int,
                 runs: int, models_dir: Path) -> dict[str, dict[str, float]]:
    """transformers' generate on the same weights: plain, prompt lookup and assisted generation.

    Measured as a user would run them (no prefilled cache: assisted generation and prompt lookup
    do not take one reliably). Decode speed as ours is defined: the tokens after the first pass's
    over the seconds from that pass's output to the last token, timed with a streamer. (Subtracting
    a separate prefill run from the total, as this bench once did, overstates prompt lookup: its
    first pass verifies drafts together with the prompt, and the difference of two long totals is
    mostly noise.)
    """
    from transformers import AutoModelForCausalLM

    dtype = target.model.dtype
    # transformers reads the bf16 weights: converted now if the models' directories lack them
    target_dir, drafter_dir = (resolve_model(m.name, models_dir, dense=True) for m in (target, drafter))
    hf_target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    hf_drafter = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    common = {"do_sample": False, "eos_token_id": sorted(target.stop_ids),
              "pad_token_id": target.tokenizer.pad_token_id or 0}
    # Loaded weights are paged in on first use: warm both models up first.
    for model in (hf_target, hf_drafter):
        with torch.inference_mode():
            model.generate(ids[:, :64], max_new_tokens=2, **common)
    variants: dict[str, dict[str, object]] = {
        "hf generate (LC)": {},
        "hf prompt lookup": {"prompt_lookup_num_tokens": 10},
        "hf assisted": {"assistant_model": hf_drafter},
    }
    results = {}
    for name, extra in variants.items():
        speeds, first_token_s = [], []
        for _ in range(runs):
            clock = _TokenClock()
            with torch.inference_mode():
                start = time.perf_counter()
                hf_target.generate(ids, max_new_tokens=new_tokens, streamer=clock, **common, **extra)
            (first, first_n), (last, _) = clock.times[0], clock.times[-1]
            generated = sum(n for _, n in clock.times)
            first_token_s.append(first - start)
            speeds.append((generated - first_n) / (last - first) if last > first else 0.0)
        results[name] = {"tokens_per_s": statistics.median(speeds), "generated": generated,
                         "prefill_s": statistics.median(first_token_s)}
    return results


def run(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,8192,16384", help="context lengths in tokens")
    parser.add_argument("--runs", type=int, default=3, help="runs per method; medians are reported")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--eta", type=float, default=0.0, help="RAPID's eta (0 keeps the target's exact output)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' assisted / prompt-lookup runs")
    parser.add_argument("--hf-runs", type=int, default=2, help="runs per transformers baseline (they are slow)")
    parser.add_argument("--hf-contexts", default="4096,8192",
                        help="context lengths that also run the transformers baselines (each prefills in full)")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp (built by `make peers`)")
    parser.add_argument("--peer-contexts", default="4096,8192,16384",
                        help="context lengths that also run llama.cpp on the same GGUF files and prompt")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"which llama.cpp runs (default {','.join(PEERS)})")
    parser.add_argument("--peer-caches", default=",".join(PEER_CACHES),
                        help=f"llama.cpp KV cache types, rows side by side (default {','.join(PEER_CACHES)})")
    parser.add_argument("--kv-dtypes", default="",
                        help="our KV cache forms to compare, rows per form (bf16,q8); default: the settings' one")
    parser.add_argument("--question", default=LONG_ANSWER_QUESTION,
                        help="asked over every context (default: one whose answer runs to several sentences)")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench_decode.json")
    add_model_options(parser)
    args = parser.parse_args(argv)
    if unknown := set(args.peers.split(",")) - set(PEERS) - {""}:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if unknown := set(args.peer_caches.split(",")) - set(PEER_CACHES) - {""}:
        parser.error(f"unknown peer cache(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEER_CACHES)}")
    settings = settings_from_args(args)
    try:
        forms = kv_form_settings(settings, args.kv_dtypes)
    except ValueError as error:
        parser.error(f"--kv-dtypes: {error}")
    question = args.question
    decoding = replace(settings.decoding, max_new_tokens=args.new_tokens, gamma=args.gamma, eta=args.eta)
    methods = [m for m in args.methods.split(",") if m]
    if BASELINE not in methods:
        methods.insert(0, BASELINE)

    args.peer = None if args.no_peers else find_llama_cpp(settings.home, torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        engines = {form: Engine(replace(form_settings, home=Path(tmp) / form, decoding=decoding),
                                log=lambda m: print(m, flush=True))
                   for form, form_settings in forms.items()}
        for each in engines.values():  # every form's models loaded before the resident size is read
            _ = (each.target, each.draft_model)
        engine = next(iter(engines.values()))
        settings = engine.settings
        target = engine.target
        loaded_gb = peak_rss_gb() if reset_peak_rss() else None  # all models loaded, nothing decoded yet
        bandwidth = copy_bandwidth_gbs()
        attention = "C kernel" if native_attention() is not None else "torch"
        report: dict[str, object] = {"machine": machine_summary(str(engine.device)),
                                     "engines": {form: {"target": engine_description(each.target),
                                                        "drafter": engine_description(each.draft_model)}
                                                 for form, each in engines.items()},
                                     "copy_bandwidth_gbs": bandwidth, "attention": attention,
                                     "target": settings.models.target, "drafter": settings.models.drafter,
                                     "dtype": str(target.model.dtype), "gamma": args.gamma, "eta": args.eta,
                                     "new_tokens": args.new_tokens, "runs": args.runs,
                                     "rss_models_loaded_gb": loaded_gb, "drafter_chunk_kv": settings.drafter_chunk_kv,
                                     "kv_forms": list(engines), "contexts": []}
        print(f"machine: {report['machine']}; copy bandwidth {bandwidth:.1f} GB/s; attention: {attention}; "
              f"resident with {2 * len(engines)} models loaded: {'-' if loaded_gb is None else f'{loaded_gb:.2f} GB'}")
        if not args.no_peers and args.peer is None:
            print("llama.cpp not built (run `make peers`): its rows are left out")
        for n_tokens in (int(c) for c in args.contexts.split(",")):
            report["contexts"].append(bench_context(engines, n_tokens, question, decoding, methods, args, bandwidth,
                                                    Path(tmp)))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


def kv_form_settings(settings: Settings, kv_dtypes: str) -> dict[str, Settings]:
    """The settings each KV form's engine runs with, by form name; no forms named: the settings' own
    form alone (named by Settings.kv_dtype, bf16 on a checkout without the 8-bit cache)."""
    if not kv_dtypes:
        return {str(getattr(settings, "kv_dtype", "bf16")): settings}
    return {form: settings_for(settings, form) for form in parse_kv_dtypes(kv_dtypes)}


def bench_context(engines: dict[str, Engine], n_tokens: int, question: str, decoding: DecodingSettings,
                  methods: list[str], args: argparse.Namespace, bandwidth: float, workdir: Path) -> dict[str, object]:
    """Every method per KV form (each form's engine ingests the same slice), then the transformers and
    llama.cpp rows once, on the first form's prompt; speedups are over the first form's LC."""
    indexes = {form: build_index(engine, n_tokens, workdir / form) for form, engine in engines.items()}
    per_form = bench_methods(engines, indexes, question, decoding, methods, args.runs)
    first_lc = next(iter(per_form.values()))[1]
    forms: dict[str, dict[str, object]] = {
        form: {"methods": rows, "lc_same_as_first_form": lc.token_ids == first_lc.token_ids}
        for form, (rows, lc) in per_form.items()}
    long_prompt = first_lc.long_prompt_tokens  # the documents and question every method's target read (RAG's aside)
    context_tokens = len(long_prompt)
    steps = verify_over_decode({form: engine.target.model for form, engine in engines.items()}, context_tokens,
                               args.gamma)
    for form, (decode_s, verify_s) in steps.items():
        forms[form].update(decode_step_s=decode_s, verify_pass_s=verify_s, verify_over_decode=verify_s / decode_s)
    engine = next(iter(engines.values()))
    target, drafter = engine.target, engine.draft_model
    lc_speed = next(iter(forms.values()))["methods"][BASELINE]["decode_tokens_per_s"]  # type: ignore[index]
    with_hf = not args.no_hf and str(n_tokens) in args.hf_contexts.split(",")
    hf = hf_baselines(target, drafter, long_prompt, args.new_tokens, args.hf_runs,
                      engine.settings.models_dir) if with_hf else {}
    for row in hf.values():
        row["speedup_vs_lc"] = row["tokens_per_s"] / lc_speed
    peers = run_peers(args, target, drafter, long_prompt, n_tokens)
    for row in peers.values():
        if row.get("tokens_per_s"):
            row["speedup_vs_lc"] = row["tokens_per_s"] / lc_speed
    for form, entry in forms.items():
        print_table(context_tokens, form, entry["methods"], entry["decode_step_s"], entry["verify_pass_s"],  # type: ignore[arg-type]
                    args.gamma)
    print_others({**hf, **peers}, next(iter(forms)), bandwidth)
    print("verify(" + str(args.gamma + 1) + ")/decode per KV form: "
          + ", ".join(f"{form} {entry['verify_over_decode']:.2f}" for form, entry in forms.items()))
    return {"context_tokens": context_tokens, "rag_tokens": len(first_lc.rag_prompt_tokens), "kv_forms": forms,
            "hf": hf, "peers": peers}


def bench_methods(engines: dict[str, Engine], indexes: dict[str, HybridIndex], question: str,
                  decoding: DecodingSettings, methods: Sequence[str],
                  runs: int) -> dict[str, tuple[dict[str, dict[str, float | None]], Done]]:
    """Every method answering the question `runs` times per KV form through the pipeline's own entry
    (the call the CLI and the UI make: retrieval, the prefix cache, the drafter's chunk KV and all);
    per form, a row per method and LC's last answer (its prompts are what the peers read).

    Within each run of a method the forms answer in turn, their order alternating from run to run
    (as verify_over_decode times their passes): this host's speed drifts over minutes by more than
    the forms differ, and a form whose runs all came minutes after the other's would carry it."""
    answers: dict[str, dict[str, list[Done]]] = {form: {} for form in engines}
    peaks: dict[str, dict[str, list[float | None]]] = {form: {} for form in engines}
    order = list(engines)
    for method in methods:
        _, settings = method_variant(method, decoding)
        for run in range(runs):
            for form in order if run % 2 == 0 else order[::-1]:
                gc.collect()  # the previous answer's caches are garbage: they should not count towards this peak
                peak_is_mine = reset_peak_rss()
                done = answer_once(engines[form], question, indexes[form], settings)
                answers[form].setdefault(method, []).append(done)
                # Both models of every form stay loaded throughout: the process's peak while this answer ran.
                peaks[form].setdefault(method, []).append(peak_rss_gb() if peak_is_mine else None)
    return {form: method_rows(engines[form], answers[form], peaks[form]) for form in engines}


def method_rows(engine: Engine, answers: dict[str, list[Done]],
                peaks: dict[str, list[float | None]]) -> tuple[dict[str, dict[str, float | None]], Done]:
    """One form's row per method from its runs' answers (medians), and LC's last answer."""
    rows: dict[str, dict[str, float | None]] = {}
    for method, done in answers.items():
        stats = [d.stats for d in done]
        passes_per_s = statistics.median(s.target_passes / s.decode_s for s in stats if s.decode_s)
        measured_peaks = [p for p in peaks[method] if p is not None]
        rows[method] = {
            "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s or 0.0 for s in stats),
            "acceptance_rate": stats[-1].acceptance_rate,
            "mean_accepted_length": stats[-1].mean_accepted_length,
            "prefill_s": statistics.median(s.prefill_s for s in stats),
            "generated": stats[-1].generated,
            # context_tokens: what the target read (the RAG prompt for RAG, the documents otherwise).
            "target_bandwidth_gbs": bytes_per_pass(engine.target.model, stats[-1].context_tokens) * passes_per_s / 1e9,
            "same_tokens_as_lc": None,
            "peak_rss_gb": max(measured_peaks) if measured_peaks else None,
            "context_tokens": stats[-1].context_tokens,
            "draft_context_tokens": stats[-1].draft_context_tokens,
            "prefix_cached_tokens": stats[-1].prefix_cached_tokens,
        }
    lc = answers[BASELINE][-1]
    for method, row in rows.items():
        row["speedup_vs_lc"] = row["decode_tokens_per_s"] / rows[BASELINE]["decode_tokens_per_s"]
        row["same_tokens_as_lc"] = answers[method][-1].token_ids == lc.token_ids
    return rows, lc


def run_peers(args: argparse.Namespace, target: LoadedModel, drafter: LoadedModel, prompt: list[int],
              n_tokens: int) -> dict[str, dict[str, float | None]]:
    """llama.cpp on the GGUF files our models were converted from, reading the same prompt tokens."""
    if args.peer is None or str(n_tokens) not in args.peer_contexts.split(","):
        return {}
    ggufs = [m.directory / "model.gguf" if m.directory else None for m in (target, drafter)]
    if not all(g is not None and g.exists() for g in ggufs):
        print("llama.cpp rows left out: the models were not loaded from GGUF files")
        return {}
    text = target.tokenizer.decode(prompt, skip_special_tokens=False)
    which = tuple(p for p in args.peers.split(",") if p)
    caches = tuple(c for c in args.peer_caches.split(",") if c)
    return measure_peers(args.peer, ggufs[0], ggufs[1], text, len(prompt), args.new_tokens, args.gamma, which,
                         caches)


def print_table(context_tokens: int, form: str, rows: dict[str, dict[str, float | None]], decode_s: float,
                verify_s: float, gamma: int) -> None:
    print(f"\ncontext {context_tokens} tokens, KV {form}: decode step {decode_s * 1e3:.0f} ms, verify of {gamma + 1} "
          f"tokens {verify_s * 1e3:.0f} ms (ratio {verify_s / decode_s:.2f})")
    print(f"{'method':20s} {'tok/s':>7s} {'vs LC':>6s} {'accept':>7s} {'len/pass':>8s} {'GB/s':>6s} "
          f"{'prefill s':>9s} {'=LC':>4s} {'peak RSS':>8s}")
    for method, r in rows.items():
        acc = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
        mal = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        print(f"{method:20s} {r['decode_tokens_per_s']:7.2f} {r['speedup_vs_lc']:5.2f}x {acc:>7s} {mal:>8s} "
              f"{r['target_bandwidth_gbs']:6.1f} {r['prefill_s']:9.1f} {'yes' if r['same_tokens_as_lc'] else 'no':>4s} "
              f"{'-' if r['peak_rss_gb'] is None else format(r['peak_rss_gb'], '.2f') + ' GB':>8s}")


def print_others(others: dict[str, dict[str, float]], first_form: str, bandwidth: float) -> None:
    """transformers' and llama.cpp's rows, their speedups over LC with our first KV form."""
    if others:
        print(f"(beside them, vs LC with KV {first_form})")
    for name, r in others.items():
        if not r.get("tokens_per_s"):
            print(f"{name:20s} failed: {r.get('error', '')[:200]}")
            continue
        acc = f"{r['acceptance_rate']:.0%}" if r.get("acceptance_rate") is not None else "-"
        print(f"{name:20s} {r['tokens_per_s']:7.2f} {r['speedup_vs_lc']:5.2f}x {acc:>7s}")
    print(f"(copy bandwidth {bandwidth:.1f} GB/s; GB/s = target bytes read per pass x passes per second)")


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
