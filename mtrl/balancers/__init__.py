"""Balancers: combine K per-task gradients (and losses) into one update direction.

Public contract (see DESIGN.md)::

    from mtrl.balancers import build, names
    b = build("cagrad", c=0.4)
    d = b.combine(grads)          # (K, D) -> (D,)
    d = b.combine(grads, losses)  # losses (K,) for loss-aware methods
"""

from mtrl.balancers.base import Balancer, gramian
from mtrl.balancers.registry import build, get_class, hparam_defaults, names, register

# Built-in methods register themselves on import.
from mtrl.balancers import (  # noqa: E402,F401  isort: skip
    aligned_mtl,
    cagrad,
    famo,
    fairgrad,
    imtl_g,
    mean,
    mgda,
    nash_mtl,
    pcgrad,
    sdmgrad,
    upgrad,
)

__all__ = ["Balancer", "build", "get_class", "gramian", "hparam_defaults", "names", "register"]
