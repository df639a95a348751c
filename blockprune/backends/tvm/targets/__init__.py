"""Target presets: x86-64, aarch64 cores, Android; Mali/Adreno GPUs; cross-compilers."""
