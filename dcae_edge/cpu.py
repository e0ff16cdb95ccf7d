"""What this CPU is, in the terms that decide the fastest precision: its model, its feature flags and its ISA
in words ("AVX2; no AVX-512, VNNI, bf16 or AMX"). Torch-free and numpy-optional: the app runtime
(``runtimes.precision``) and the trainer (``dcae_edge.training_utils``) both ask here.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, ...]:
    """/proc/cpuinfo's lines, read once (empty where there is none: macOS, Windows)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpuinfo_value(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of ``keys``."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith(keys)), None)


def cpu_model() -> str:
    return _cpuinfo_value("model name") or platform.processor() or platform.machine()


# oneDNN (OpenVINO's CPU kernels, torch's) takes ONEDNN_MAX_CPU_ISA: capped at AVX512_CORE_BF16 an AMX Xeon runs
# AVX-512 bf16 kernels. What a cap takes away is not this process's to time or cache under the CPU's full name.
ONEDNN_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")
FLAG_NEEDS = {"avx2": "AVX2", "avx_vnni": "AVX2_VNNI", "avx512": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI",
              "avx512_bf16": "AVX512_CORE_BF16", "avx512_fp16": "AVX512_CORE_FP16", "amx": "AVX512_CORE_AMX"}


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped at in this process (ONEDNN_MAX_CPU_ISA, or DNNL_ as before v2), None if uncapped."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return cap if cap in ONEDNN_ISA_ORDER else None


def capped(flags: set[str], cap: str | None) -> set[str]:
    """``flags`` without those oneDNN capped at ``cap`` does not use."""
    if cap is None:
        return flags
    level = ONEDNN_ISA_ORDER.index(cap)

    def needs(flag: str) -> str | None:
        if flag in FLAG_NEEDS:
            return FLAG_NEEDS[flag]
        return FLAG_NEEDS["amx"] if flag.startswith("amx") else FLAG_NEEDS["avx512"] if flag.startswith("avx512") else None

    return {f for f in flags if needs(f) is None or ONEDNN_ISA_ORDER.index(needs(f)) <= level}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), else numpy's view of them; None if unknown;
    less what a oneDNN ISA cap in the environment takes away."""
    flags = _cpuinfo_value("flags", "Features")  # x86 / ARM
    if flags is not None:
        return capped(set(flags.split()), onednn_isa_cap())
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return None
    names = {"AVX2": "avx2", "AVX512VNNI": "avx512_vnni", "AVX512F": "avx512f"}
    return capped({names[k] for k, on in features.items() if on and k in names}, onednn_isa_cap())


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # native bf16 arithmetic
ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX"}


def cpu_isa(flags: set[str] | None = None) -> str:
    """What decides the fastest precision here, in words: e.g. "AVX2; no AVX-512, VNNI, bf16 or AMX"; for this
    process (no ``flags`` given) with the oneDNN cap, if any: "...; oneDNN capped at AVX512_CORE_BF16"."""
    if flags is None:
        flags, cap = cpu_flags(), onednn_isa_cap()
        return "ISA unknown" if flags is None else cpu_isa(flags) + (f"; oneDNN capped at {cap}" if cap else "")
    if not flags & {"sse2", "avx2"}:  # not x86: name the ARM features INT8 and bf16 kernels use
        arm = [name for flag, name in (("asimddp", "dot product"), ("i8mm", "i8mm"), ("bf16", "bf16"), ("sve", "SVE"))
               if flag in flags]
        return f"{platform.machine()}" + (f": {', '.join(arm)}" if arm else "")
    have = [name for flag, name in ISA_NAMES.items() if flag in flags]
    lacks = [name for name, present in (("AVX-512", "avx512f" in flags), ("VNNI", bool(flags & VNNI_FLAGS)),
                                        ("bf16", has_fast_bf16(flags)), ("AMX", "amx_tile" in flags))
             if not present]
    return ", ".join(have or ["no AVX2"]) + ("; no " + ", ".join(lacks[:-1]) + (" or " if len(lacks) > 1 else "") + lacks[-1]
                                             if lacks else "")


def has_fast_bf16(flags: set[str] | None = None) -> bool:
    """Native bf16 arithmetic (AMX or AVX512-BF16): where bf16 autocast and OpenVINO's bf16 hint pay off."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags and flags & BF16_FLAGS)


def cpu_key() -> str:
    """Which CPU timings belong to: the model name and the ISA (a VM may name an AVX2 Zen 3 and an AVX-512
    Zen 4 both "AMD EPYC", and the fastest precision differs between them)."""
    return f"{cpu_model()} [{cpu_isa()}]"
