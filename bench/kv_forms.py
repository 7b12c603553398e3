"""The KV cache forms a bench compares, by the names `--kv-dtypes` takes: bf16 (the model's dtype)
and q8 (the 8-bit form of decoding/kv_quant.py).

A bench reaches a form two ways: below the pipeline through load_model's kv_dtype, and through the
pipeline through Settings.kv_dtype. A checkout without the 8-bit cache has neither; bf16 is then
what it stores anyway, and asking for q8 there is an error that says so, before any model loads.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch

from app.config import Settings

KV_FORMS = ("bf16", "q8")
# load_model's kv_dtype per form: None keeps the model's dtype
LOAD_KV_DTYPE: dict[str, torch.dtype | None] = {"bf16": None, "q8": torch.uint8}


def parse_kv_dtypes(text: str) -> list[str]:
    """'bf16,q8' -> ['bf16', 'q8']; unknown, repeated or no forms are an error."""
    forms = [f.strip() for f in text.split(",") if f.strip()]
    if not forms:
        raise ValueError(f"no KV form given; choose from {', '.join(KV_FORMS)}")
    if unknown := [f for f in forms if f not in KV_FORMS]:
        raise ValueError(f"unknown KV form(s) {', '.join(unknown)}; choose from {', '.join(KV_FORMS)}")
    if len(set(forms)) != len(forms):
        raise ValueError(f"a KV form is named twice in {text!r}")
    return forms


def loader_takes_kv_dtype(load: Callable[..., object]) -> bool:
    return "kv_dtype" in inspect.signature(load).parameters


def settings_take_kv_dtype() -> bool:
    return "kv_dtype" in {f.name for f in dataclasses.fields(Settings)}


def load_options(form: str, load: Callable[..., object]) -> dict[str, torch.dtype]:
    """load_model's keyword arguments for a form: none for bf16 (the model's dtype, on any checkout)."""
    kv_dtype = LOAD_KV_DTYPE[form]
    if kv_dtype is None:
        return {}
    if not loader_takes_kv_dtype(load):
        raise ValueError(f"KV form {form}: this checkout's load_model takes no kv_dtype (the 8-bit KV cache "
                         "is not in it); use --kv-dtypes bf16")
    return {"kv_dtype": kv_dtype}


def settings_for(settings: Settings, form: str) -> Settings:
    """settings with the pipeline's KV form set to `form`."""
    if settings_take_kv_dtype():
        return dataclasses.replace(settings, kv_dtype=form)  # type: ignore[call-arg]
    if form != "bf16":
        raise ValueError(f"KV form {form}: this checkout's Settings have no kv_dtype (the 8-bit KV cache is "
                         "not in it); use --kv-dtypes bf16")
    return settings
