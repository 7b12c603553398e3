"""The engine description (decoding.engine_info) as one line for people and as a key for the LC reference."""

from __future__ import annotations


def engine_label(description: dict[str, str]) -> str:
    """Engine, kernels, KV form and threads on one line ("engine unknown" for records made before it
    was kept; records made before the KV form was kept name none)."""
    if not description:
        return "engine unknown"
    kv = f", KV {description['kv_cache']}" if "kv_cache" in description else ""
    return (f"{description.get('engine', '?')}; linear {description.get('linear_kernel', '?')}, "
            f"attention {description.get('attention_kernel', '?')}{kv}, {description.get('threads', '?')} threads")
