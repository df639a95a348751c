"""The block-sparse TensorIR kernels: CPU (AVX2/AVX-512/NEON register tiles) and OpenCL GPU."""
