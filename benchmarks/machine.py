"""What a CPU figure depends on: the CPU, its vector extensions, its cores and their load.

How much an XLA option or a PyTorch kernel gains depends on the SIMD extensions (AVX2 against
AVX-512 and its BF16), and a figure taken while other processes hold the cores does not hold for a
quiet machine, so every benchmark prints these beside its figures.
"""

import os
import platform

VECTOR_EXTENSIONS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16')


def _cpuinfo_field(name: str) -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line.split(':', 1)[1].strip() for line in f if line.startswith(name)), '')
  except OSError:
    return ''


def cpu_model() -> str:
  return _cpuinfo_field('model name') or platform.processor() or 'unknown'


def cpu_vector_extensions() -> str:
  """Which of VECTOR_EXTENSIONS the CPU has, from /proc/cpuinfo."""
  present = set(_cpuinfo_field('flags').split())
  if not present:
    return 'unknown'
  return ' '.join(f for f in VECTOR_EXTENSIONS if f in present) or 'no AVX2/AVX-512/AMX'


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def load_average() -> float:
  return os.getloadavg()[0]


def load_verdict(load_at_start: float) -> str:
  """'machine loaded' when the 1-minute load average before the benchmark started exceeds half the
  cores: other processes then held part of the cores the figures assume. (A load read later counts
  the benchmark's own threads.)"""
  return 'machine loaded' if load_at_start > cores() / 2 else 'machine quiet'
