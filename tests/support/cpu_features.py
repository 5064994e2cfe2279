"""Running the tests as on a CPU without AVX512-BF16, on any CPU: bitsandbytes asks its native library once
(`lib.has_avx512bf16_cpu`) whether the CPU has it, and decides from that whether 4-bit layers repack for
inference and whether its packed CPU kernel is registered. With SIMULATE_NO_AVX512_BF16=1 the tests' conftest
makes that answer no before bitsandbytes is imported, so that a machine with AVX512-BF16 also checks the verdicts
of a machine without it (`grep -o avx512_bf16 /proc/cpuinfo` tells which one this is)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _NoAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.lib.has_avx512bf16_cpu = lambda: False

        spec.loader.exec_module = exec_module
        return spec


def simulate_cpu_without_avx512_bf16() -> None:
    if "bitsandbytes" in sys.modules:
        raise RuntimeError("bitsandbytes is already imported: simulate before importing it")
    sys.meta_path.insert(0, _NoAvx512Bf16())
