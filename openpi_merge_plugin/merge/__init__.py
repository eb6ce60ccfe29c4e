"""The merge: per-slice kernels, column pieces, the engine that plans and streams it, and delta statistics."""
