"""Stream items and their base: resolving what the user named, file vs in-memory names, LoRA adapters, pre-flight."""
