"""Artifacts and running them: manifest, native/qemu runners, RPC server, board bundles."""
