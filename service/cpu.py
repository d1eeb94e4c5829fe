"""Which CPU this is, and the instruction-set extensions that decide which kernels the runtimes pick.

oneDNN (under PyTorch and OpenVINO), MKL and ONNX Runtime choose their kernels per instruction set, so speed and the
last bits of float results depend on the CPU: Intel with AMX (bf16 and int8 matrix tiles) and AMD EPYC with AVX-512
BF16/VNNI (no AMX) give other figures for the same command. Benchmarks print :func:`cpu_info`'s summary, ``/info``
reports it next to the runtime and precision in use, and the reference tests record it with their references.
Torch-free; reads ``/proc/cpuinfo`` on Linux (elsewhere only the platform's processor name is known).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

#: The extensions that change the kernels the runtimes pick, as /proc/cpuinfo names them, with the name shown.
EXTENSIONS = {
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512f": "AVX-512",
    "avx_vnni": "AVX-VNNI",
    "avx2": "AVX2",
}

#: The bits of the int8 weights an export writes unless asked: 7, on which no CPU saturates
#: (:attr:`CpuInfo.int8_saturates`); the manifest records them (``int8["weight_bits"]``)
INT8_WEIGHT_BITS = 7
#: the weight bits ONNX Runtime's quantizer knows (``reduce_range`` or not); 8 for CPUs with VNNI or AMX only
INT8_WEIGHT_BITS_CHOICES = (7, 8)


@dataclass(frozen=True)
class CpuInfo:
    model_name: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C", ...
    vendor: str  # GenuineIntel | AuthenticAMD | "" where unknown
    family: str
    model: str
    stepping: str
    architecture: str  # x86_64, aarch64, ...
    cores: int  # the cores this process may run on
    extensions: tuple[str, ...]  # of EXTENSIONS' values present, in its order

    @property
    def kind(self) -> str:
        """The class of kernels oneDNN picks: "AMX", "AVX-512 BF16", "AVX-512", "AVX2" or "other"."""
        kinds = {"AMX-BF16": "AMX", "AVX-512 BF16": "AVX-512 BF16", "AVX-512": "AVX-512", "AVX2": "AVX2"}
        return next((kind for name, kind in kinds.items() if name in self.extensions), "other")

    @property
    def has_bf16(self) -> bool:
        """Native bf16 units (AMX tiles or AVX-512 BF16), where bf16 convolutions pay."""
        return "AMX-BF16" in self.extensions or "AVX-512 BF16" in self.extensions

    @property
    def int8_saturates(self) -> bool:
        """An x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI) or AMX-INT8: its int8 kernels sum uint8 x int8 products
        pairwise in 16 bits (``vpmaddubsw``), which saturates on 8-bit weights; 7-bit weights never reach it."""
        x86 = self.architecture in ("x86_64", "AMD64", "i686", "i386")
        return x86 and not {"AMX-INT8", "AVX-512 VNNI", "AVX-VNNI"} & set(self.extensions)

    def summary(self) -> str:
        """One line for logs and benchmark headers: model, cores and the extensions that matter."""
        ids = f" (family {self.family} model {self.model} stepping {self.stepping})" if self.family else ""
        found = ", ".join(self.extensions) or "none of " + ", ".join(EXTENSIONS.values())
        amx = "" if "AMX-BF16" in self.extensions or not self.extensions else "; no AMX"
        return f"{self.model_name}{ids}, {self.cores} cores, {self.architecture}: {found}{amx}"

    def to_dict(self) -> dict:
        return asdict(self) | {"kind": self.kind, "extensions": list(self.extensions)}


def parse_cpuinfo(text: str, cores: int, architecture: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (its first processor's block)."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(
        model_name=fields.get("model name") or platform.processor() or architecture,
        vendor=fields.get("vendor_id", ""),
        family=fields.get("cpu family", ""),
        model=fields.get("model", ""),
        stepping=fields.get("stepping", ""),
        architecture=architecture,
        cores=cores,
        extensions=tuple(name for flag, name in EXTENSIONS.items() if flag in flags),
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or `taskset`'s limit), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once)."""
    cores = usable_cpus()
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, cores, platform.machine())
