"""The engine description (decoding.engine_info) as one line for people and as a key for the LC reference."""

from __future__ import annotations


def engine_label(description: dict[str, str]) -> str:
    """Engine, kernels and threads on one line ("engine unknown" for records made before it was kept)."""
    if not description:
        return "engine unknown"
    return (f"{description.get('engine', '?')}; linear {description.get('linear_kernel', '?')}, "
            f"attention {description.get('attention_kernel', '?')}, {description.get('threads', '?')} threads")
