"""Package-wide settings: deterministic mode and the extension's CPU operators.

In deterministic mode (the default) the Triton expert kernels run with one
fixed launch configuration per GPU generation, so the same inputs give the same
bits in every process on GPUs of that generation. With it off, the kernels time
a few candidate configurations on the first call of each shape and keep the
fastest. The choice can differ from process to process, and so can the
rounding of the matrix products. Within one process, repeated calls give the
same bits in both modes: no kernel of the package accumulates with atomics.

``torch.use_deterministic_algorithms(True)`` also turns the mode on. The
environment variable ``INHIBMOE_FAST_DETERMINISTIC=0`` (or false, no, off)
sets the initial value off.

The CPU operators of the compiled extension (grouped expert products run one
group per thread, and SwiGLU in one pass) are on by default where the
extension is built. Turned off, the CPU path runs the same steps with PyTorch
operations, which give the same results up to rounding. The environment
variable ``INHIBMOE_FAST_CPU_OPERATORS=0`` (or false, no, off) sets the
initial value off.
"""

from __future__ import annotations

import os

import torch


def _environment_flag(name: str) -> bool:
    """Return the value of an on/off environment variable, True when it is unset."""
    value = os.environ.get(name, "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is invalid; expected 1, true, yes, on, 0, false, no or off")


_deterministic = _environment_flag("INHIBMOE_FAST_DETERMINISTIC")
_cpu_operators = _environment_flag("INHIBMOE_FAST_CPU_OPERATORS")


def set_deterministic(enabled: bool) -> None:
    """Turn deterministic mode on or off for the whole process."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    global _deterministic
    _deterministic = enabled


def is_deterministic() -> bool:
    """Return True when deterministic mode is on (set here or by ``torch.use_deterministic_algorithms``)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


def set_cpu_operators(enabled: bool) -> None:
    """Turn the extension's CPU operators on or off for the whole process."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    global _cpu_operators
    _cpu_operators = enabled


def cpu_operators_enabled() -> bool:
    """Return True when the CPU path may use the extension's CPU operators."""
    return _cpu_operators
