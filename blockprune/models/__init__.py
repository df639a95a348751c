"""Model zoo: loading (local dir, named config, bundled MiniLM), the architecture registry, ONNX export.

Importing this package does not import torch; ``zoo`` and ``export`` do so lazily.
"""

from blockprune.models.registry import ARCHITECTURES, Architecture, get_architecture

__all__ = ["ARCHITECTURES", "Architecture", "get_architecture"]
