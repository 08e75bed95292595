"""Bytes on disk and on the Hub: validated safetensors reads, the one streaming writer, checkpoints, remote sources."""
