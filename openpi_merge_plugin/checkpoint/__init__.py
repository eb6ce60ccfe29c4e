"""Checkpoint I/O: Orbax readers (whole, per layer slice, stream-decoded), the streaming Orbax and safetensors
writers, the output rules, commit and manifest. What a format's files hold is formats/'s."""
