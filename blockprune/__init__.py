"""blockprune: hardware-friendly block-structured pruning of transformers, compiled for the edge.

Data flows one way: ``models`` -> ``frontends`` -> ``passes`` -> ``backends``. The modules at the
package root (``blocks``, ``masks``, ``errors``, ``io``) are numpy-only and shared by all layers.
"""

__version__ = "0.1.0"

from blockprune.errors import BlockpruneError

__all__ = ["BlockpruneError", "__version__"]
