"""Checkpoint I/O: Orbax readers, the streaming Orbax writer, the PyTorch layout and writer, commit and manifest."""
