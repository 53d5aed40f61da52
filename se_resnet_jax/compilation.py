"""The compile policy: which XLA options every program the library compiles gets, by backend.

On a CPU, XLA's own convolutions beat the default YNNPACK fusions for these networks (about 3x for
the training step on an AVX2-only CPU: BENCHMARKS.md). The options change how a program is
compiled, not what it computes. Every `jax.jit` of the library goes through `jit`.
"""

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import jax
from absl import logging

# Options per backend (`jax.default_backend()`); a backend not listed compiles with XLA's defaults.
BACKEND_OPTIONS: dict = {'cpu': {'xla_cpu_experimental_ynn_fusion_type': ''}}


def _option_probe(x):
  return x + 1


@functools.cache
def _known(backend: str, name: str, value: Any) -> bool:
  """Whether this XLA accepts the option `name` (compiling a one-op program with it, once)."""
  device = jax.devices(backend)[0]
  spec = jax.ShapeDtypeStruct((), 'float32', sharding=jax.sharding.SingleDeviceSharding(device))
  try:
    jax.jit(_option_probe, compiler_options={name: value}).lower(spec).compile()
  except Exception as e:  # noqa: BLE001 - XLA's error type for an unknown option varies
    logging.warning('XLA on %s does not take the compile option %s (%s); compiling without it.',
                    backend, name, str(e).splitlines()[0][:160])
    return False
  return True


def compiler_options(backend: Optional[str] = None, **extra: Any) -> Optional[dict]:
  """The policy's options for `backend` (default: JAX's default backend) plus `extra`, those
  this XLA knows; None (`jax.jit`'s "XLA's defaults") when there are none."""
  backend = backend or jax.default_backend()
  options = {**BACKEND_OPTIONS.get(backend, {}), **extra}
  known = {name: value for name, value in options.items() if _known(backend, name, value)}
  return known or None


def jit(fun: Callable, *, cpu_options: Optional[dict] = None, **jit_kwargs: Any) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` with the policy's options (read now, when the program is
  built), plus `cpu_options` on a CPU."""
  extra = cpu_options if jax.default_backend() == 'cpu' and cpu_options else {}
  return jax.jit(fun, compiler_options=compiler_options(**extra), **jit_kwargs)


@contextlib.contextmanager
def xla_defaults() -> Iterator[None]:
  """Programs built by `jit` within compile with XLA's defaults (the benchmark's baseline)."""
  saved = dict(BACKEND_OPTIONS)
  BACKEND_OPTIONS.clear()
  try:
    yield
  finally:
    BACKEND_OPTIONS.update(saved)
