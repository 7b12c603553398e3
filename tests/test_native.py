"""The kernels' build key covers every local header a kernel includes, so a shared header's edit rebuilds both."""

from __future__ import annotations

from pathlib import Path

from decoding.native import kernel_sources

KERNELS = Path(__file__).resolve().parent.parent / "decoding" / "kernels"


def test_the_build_key_hashes_the_headers_a_kernel_includes(tmp_path: Path) -> None:
    (tmp_path / "shared.h").write_text("static int one(void) { return 1; }\n")
    source = tmp_path / "kernel.c"
    source.write_text('#include <stdint.h>\n#include "shared.h"\nint two(void) { return one() + 1; }\n')
    before = kernel_sources(source)
    (tmp_path / "shared.h").write_text("static int one(void) { return 2 - 1; }\n")
    assert kernel_sources(source) != before


def test_both_kernels_share_common_h() -> None:
    common = (KERNELS / "common.h").read_bytes()
    for name in ("attention.c", "quant_linear.c"):
        assert common in kernel_sources(KERNELS / name)
        assert b"f32_to_bf16(float f) {" not in (KERNELS / name).read_bytes()  # written once, in common.h
