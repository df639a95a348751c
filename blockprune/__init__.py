"""blockprune: hardware-friendly block-structured pruning of transformers, compiled for the edge.

Data flows one way: ``models`` -> ``frontends`` -> ``passes`` -> ``backends``. The modules at the
package root (``blocks``, ``masks``, ``errors``, ``io``) are numpy-only and shared by all layers.

The toolchain API (``blockprune.export``, ``prune``, ``compress``, ``compile``, ``run``,
``bench``; see ``blockprune.api``) is imported on first use, so ``import blockprune`` stays light.
"""

__version__ = "0.1.0"

from blockprune.errors import BlockpruneError

_API = ("export", "prune", "compress", "compile", "run", "bench")

__all__ = ["BlockpruneError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from blockprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'blockprune' has no attribute {name!r}")
