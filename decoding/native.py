"""Compiling and loading the C kernels (decoding/kernels/*.c) with the system's C compiler.

Each kernel is built once per source, flags and CPU into a cache folder and loaded with ctypes.
By default it is built for this CPU (-march=native); RAPIDQA_KERNEL_ISA=avx2 or =portable builds
the AVX2 or the plain C paths instead (to measure them, or for a CPU that -march=native misjudges).
Every path of a kernel gives the same bits, so the choice changes speed only.

When a kernel cannot be built, the reason is kept (no compiler, a compile error) so the engine
can say why it runs slower (decoding/engine_info.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ISA_VARIABLE = "RAPIDQA_KERNEL_ISA"
# -ffp-contract=off: only the fused multiply-adds the sources write are fused, so builds for
# different instruction sets round alike.
BASE_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
ISA_FLAGS = {
    "native": ("-march=native",),
    "avx2": ("-march=haswell", "-mtune=generic"),  # AVX2, FMA, F16C: most laptop and desktop CPUs
    "portable": (),
}


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class KernelLoad:
    """A loaded kernel library, or None and why not."""

    library: ctypes.CDLL | None
    reason: str  # "" when the library loaded


def kernel_isa() -> str:
    """The instruction set the kernels are built for: RAPIDQA_KERNEL_ISA, default native."""
    isa = os.environ.get(ISA_VARIABLE, "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_VARIABLE}={isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    return isa


def kernel_flags(isa: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (*BASE_FLAGS, *ISA_FLAGS[isa], *extra)


def kernel_cache_dir() -> Path:
    configured = os.environ.get("RAPIDQA_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rapidqa" / "kernels"


def _machine_fingerprint() -> str:
    # -march=native code is only valid on the CPU it was built for: key the build by CPU flags.
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def kernel_sources(source_path: Path) -> bytes:
    """A kernel's source and every local header it includes (#include "..."), for its build key:
    an edit to a shared header must rebuild every kernel that includes it."""
    source = source_path.read_bytes()
    headers = re.findall(rb'^#include "([^"]+)"', source, flags=re.M)
    return source + b"".join(kernel_sources(source_path.parent / name.decode()) for name in headers)


def build_library(source_path: Path | str, flags: tuple[str, ...], cache_dir: Path, name: str) -> Path:
    """Compile a C source into cache_dir (once per source, flags and CPU); returns the library.
    Raises KernelUnavailable, saying why, when there is no compiler or the source does not compile."""
    wanted = os.environ.get("CC", "cc")
    compiler = shutil.which(wanted)
    if compiler is None:
        raise KernelUnavailable(f"no C compiler ({wanted}) found: install gcc")
    key = hashlib.sha256(kernel_sources(Path(source_path)) + " ".join(flags).encode()
                         + _machine_fingerprint().encode()).hexdigest()
    library = cache_dir / f"{name}-{key[:16]}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = Path(tmp) / library.name
        try:
            subprocess.run([compiler, *flags, "-o", str(built), str(source_path)], check=True,
                           capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError as error:
            lines = [line for line in (error.stderr or "").splitlines() if "error" in line] or [str(error)]
            raise KernelUnavailable(f"{Path(source_path).name} did not compile with {wanted}: {lines[0]}") from error
        except (OSError, subprocess.SubprocessError) as error:
            raise KernelUnavailable(f"{wanted} failed on {Path(source_path).name}: {error}") from error
        os.replace(built, library)  # atomic: concurrent builders never load a half-written file
    return library


def load_kernel(source_path: Path | str, name: str, switch: str, extra_flags: tuple[str, ...] = ()) -> KernelLoad:
    """The kernel built for kernel_isa() and loaded, or None and why: switched off by `switch`=0,
    no compiler, a compile error or a library that does not load."""
    if os.environ.get(switch, "1") == "0":
        return KernelLoad(None, f"switched off by {switch}=0")
    try:
        path = build_library(source_path, kernel_flags(kernel_isa(), extra_flags), kernel_cache_dir(), name)
        return KernelLoad(ctypes.CDLL(str(path)), "")
    except KernelUnavailable as error:
        return KernelLoad(None, str(error))
    except OSError as error:
        return KernelLoad(None, f"the {name} kernel did not load: {error}")
