"""Golden step folders: every method on tiny models, hashed file by file.

``python tests/support/golden_steps.py record`` writes ``golden_steps.json`` (the SHA-256 of every file of every
step folder of every case below, plus the library versions they were made with); the test
``tests/engine/test_golden_steps.py`` rebuilds the same cases and asserts the same bytes. The hashes were first
recorded with the code before the architecture change (86278f0), so a refactor that changes a single
byte of a weight shard, a carried-state file, the state JSON or the card fails here. They were recorded
again once, when local fingerprints became a digest of every tensor (``io/checkpoint.ContentDigest``):
every weight and carried-state file kept its bytes, and the state JSON and the card differed from the
earlier ones in the fingerprint strings only (checked by diffing both versions' outputs field by field).
And once more when OPCM began to report the diagonal entries it leaves in place (issue 14): the OPCM
cases' weights and carried state kept their bytes; their state JSON gained the scalars
``diagonal_kept``, ``diagonal_kept_share`` and ``diagonal_null`` and their cards show them (checked
the same way). And once more for state format 3 (issue 15: the weight slot carried over the
published weights, ``artifacts/compact.py``), on an AMD EPYC: every published file (weights, heads,
adapters, configs) kept its bytes in every case, every carried slot read back through
``open_slot`` equals the format-2 float32 tensor bit for bit, and the state JSON differs in
``format_version``, ``weight_slot`` and its ``tensors`` description only (checked by running both
versions on these cases). The files that changed there were recorded as the reference and this
processor's overrides for them dropped; the OPCM cases' new files are compared by summaries on
other processors, as before. And for state format 4 (the low bits compressed): only the state JSON
(``format_version``, the ``tensors`` description) and the ``low16-*`` files changed, these giving back
the recorded float32 state bit for bit (checked against the recorded summaries); their hashes were
updated in place, and the test compares files of compressed blocks (``low16-*``, and MagMax's
``tau_max``, compressed as well) by that state, not by their zstd bytes. And for state format 5 (the low
bits' frames palette-coded, ``KEY::pal16[a:b]``): the same two kinds of file changed, the state JSON in
``format_version`` and the ``tensors`` description only, the ``low16-*`` files giving back the recorded
state (checked against the recorded summaries); hashes updated in place again.

Fixtures are built deterministically in a scratch folder and every source is given by a relative
path (the state and card record sources as given), so the bytes do not depend on where it runs.

Except on one point: the OPCM cases take SVDs and eigendecompositions through LAPACK (MKL in the
CPU wheel), whose last bits depend on the processor it dispatches for (the hashes were recorded on
an Intel Xeon; on an AMD EPYC the same wheel gives other last bits in the OPCM cases' merged
weights and states, and every other case the same bytes). So the golden file holds, besides the
reference bytes
(``cases``):

- ``machines``: per processor (:func:`machine`: CPU vendor / torch's CPU capability), the hashes of
  the files that differ there from the reference, recorded with ``record-machine`` after checking
  that they differ by rounding only (the summaries below); on such a machine every byte is exact;
- ``summaries``: per file, what survives rounding: each tensor's dtype, shape, norm and a seeded
  random projection, each JSON file parsed, each card's text with its numbers. On a processor not
  listed, the LAPACK cases (:data:`LINALG`) are compared by these within a tolerance (``1e-4`` of the
  tensor's norm; numbers to ``1e-3``); every other case stays byte-exact everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden_steps.json"
VERSIONS = ("torch", "transformers", "safetensors", "huggingface_hub", "peft")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_fixtures(root: Path) -> None:
    """Tiny models saved under ``root``: Llama (fp32 and bf16), GPT-2, BERT with classifiers, LoRA adapters."""
    from peft import LoraConfig

    from support.tiny_models import bert, bert_classifier, llama, make_stream, perturb, save, save_lora

    make_stream(root, "llama", 3)
    make_stream(root, "gpt2", 2)
    bf16 = root / "bf16"
    bf16.mkdir()
    make_stream(bf16, "llama", 2, torch.bfloat16)
    torch.manual_seed(0)
    backbone = bert()
    save(backbone, root / "bert-base")
    for i, labels in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        model = bert_classifier(labels)
        model.bert.load_state_dict(backbone.state_dict(), strict=False)
        save(perturb(model, seed=20 + i), root / f"bert-task{i}")
    torch.manual_seed(0)
    base = llama()
    base.save_pretrained(root / "lora-base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJ)
    for i in range(3):
        folder = save_lora(base, config, 100 + i, root / f"lora{i}", 0.1)
        # PEFT writes target_modules in set order, which depends on the interpreter's hash seed
        adapter_config = folder / "adapter_config.json"
        values = json.loads(adapter_config.read_text())
        values["target_modules"] = sorted(values["target_modules"])
        adapter_config.write_text(json.dumps(values, indent=2, sort_keys=True))


# name -> merge arguments (sources relative to the fixtures root); each writes OUT/step-1..T
CASES: dict[str, list[str]] = {
    "average": ["--base", "llama-base", "--stream", "llama-ft0", "llama-ft1", "llama-ft2", "--method", "average"],
    "task_arithmetic_bf16_sliced": ["--base", "bf16/llama-base", "--stream", "bf16/llama-ft0", "bf16/llama-ft1",
                                    "--method", "task_arithmetic", "--set", "scaling=0.4", "--chunk-mb", "0.002"],
    "ties": ["--base", "llama-base", "--stream", "llama-ft0", "llama-ft1", "llama-ft2", "--method", "ties",
             "--set", "top_k=0.3"],
    "magmax_fp16_out": ["--base", "llama-base", "--stream", "llama-ft0", "llama-ft1", "--method", "magmax",
                        "--dtype", "float16"],
    "opcm_sharded": ["--base", "llama-base", "--stream", "llama-ft0", "llama-ft1", "llama-ft2", "--method", "opcm",
                     "--chunk-mb", "0.002", "--shard-size", "20KB"],
    "opcm_svd_nodiag": ["--base", "llama-base", "--stream", "llama-ft0", "llama-ft1", "llama-ft2", "--method", "opcm",
                        "--set", "kernel=svd", "--set", "zero_diagonal=false", "--set", "alpha=0.3"],
    "opcm_gpt2": ["--base", "gpt2-base", "--stream", "gpt2-ft0", "gpt2-ft1", "--method", "opcm"],
    "opcm_heads": ["--base", "bert-base", "--stream", "bert-task0", "bert-task1", "--method", "opcm"],
    "opcm_lora_factored": ["--base", "lora-base", "--stream", "lora0", "lora1", "llama-ft2", "--method", "opcm",
                           "--chunk-mb", "0.002"],
    "opcm_lora_dense": ["--base", "lora-base", "--stream", "lora0", "lora1", "--method", "opcm", "--lowrank", "off"],
    "opcm_lora_adapter": ["--base", "lora-base", "--stream", "lora0", "lora1", "lora2", "--method", "opcm",
                          "--output-format", "adapter", "--max-rank", "6"],
    "average_lora": ["--base", "lora-base", "--stream", "lora0", "lora1", "--method", "average", "--dtype", "bfloat16"],
}


LINALG = {name for name in CASES if name.startswith("opcm")}  # cases whose bytes depend on the processor's LAPACK
TOLERANCE = 1e-4  # of a tensor's norm: float32 rounding of a different LAPACK path, far below any change of method
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def machine() -> str:
    """The processor LAPACK dispatches for: CPU vendor and torch's CPU capability."""
    vendor = "unknown"
    try:
        vendor = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        import platform

        vendor = platform.processor() or platform.machine()
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}"


BLOCK = re.compile(r"::(pal16|low16|f32)\[\d+:\d+\]$")


def holds_blocks(path: Path) -> bool:
    """A state file of compressed blocks (``artifacts/compact.py``), whose bytes a zstandard release may change."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(BLOCK.search(k) for k in f.keys())


def summarise(path: Path) -> Any:
    """What a file holds, up to rounding (see the module docstring). The low bits of a compact state
    (``low16-*``) are summarised as the float32 state they give back with the published weights, and
    the list of its exact ties (``ties-*``), rounding noise itself, by nothing but its name."""
    if path.suffix == ".safetensors" and path.name.startswith("ties-"):
        return "ties"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from hf_contmerge.artifacts.folder import open_slot

        out = {}
        compact = None
        if path.name.startswith("low16-") or holds_blocks(path):  # the carried state these files give back
            slot = re.sub(r"-\d{5}-of-\d{5}$", "", path.name.removeprefix("low16-").removesuffix(".safetensors"))
            compact = open_slot(path.parent.parent, slot, slot if path.name.startswith("low16-") else None)
        with safe_open(path, "pt") as f:
            # compressed blocks (state format 4): KEY::low16[a:b], KEY::f32[a:b] summarised as their tensors
            keys = f.keys() if compact is None else dict.fromkeys(BLOCK.sub("", k) for k in f.keys())
            for key in keys:
                t = f.get_tensor(key) if compact is None else compact.read(key)
                x = t.double().flatten() if t.is_floating_point() else t.flatten().double()
                r = torch.randn(x.numel(), generator=torch.Generator().manual_seed(x.numel()), dtype=torch.float64)
                out[key] = [str(t.dtype), list(t.shape), float(x.norm()), float(x @ r) / math.sqrt(max(x.numel(), 1))]
        if compact is not None:
            compact.close()
        return out
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    return {"text": NUMBER.sub("#", text), "numbers": [float(n) for n in NUMBER.findall(text)]}


def summaries(out: Path) -> dict[str, Any]:
    return {str(p.relative_to(out)): summarise(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0].startswith("step-")}


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    """Where two summaries differ by more than rounding."""
    if isinstance(want, dict) and isinstance(got, dict):
        if sorted(want) != sorted(got):
            return [f"{where}: keys {sorted(set(want) ^ set(got))}"]
        return [d for k in want for d in differences(want[k], got[k], f"{where}/{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) == 4 and isinstance(want[0], str) and want[0].startswith("torch.") and isinstance(want[2], float):
            scale = TOLERANCE * max(want[2], 1e-30)  # a tensor: [dtype, shape, norm, projection]
            same = want[:2] == got[:2] and abs(want[2] - got[2]) <= scale and abs(want[3] - got[3]) <= scale
            return [] if same else [f"{where}: {want} there, {got} here"]
        if len(want) != len(got):
            return [f"{where}: {len(want)} entries there, {len(got)} here"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(want, bool):
        return [] if math.isclose(want, got, rel_tol=1e-3, abs_tol=1e-6) else [f"{where}: {want} there, {got} here"]
    return [] if want == got else [f"{where}: {want!r} there, {got!r} here"]


def hash_steps(out: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``out``'s step folders."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0].startswith("step-")
    }


def run_cases(root: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Run the cases in ``root`` (fixtures already built there); their hashes by case name (the step
    folders stay in ``root/out-{case}``)."""
    from hf_contmerge.cli import main

    results = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name in names or list(CASES):
            code = main(["merge", *CASES[name], "--out", f"out-{name}", "--quiet"])
            if code != 0:
                raise RuntimeError(f"golden case {name} exited with {code}")
            results[name] = hash_steps(root / f"out-{name}")
    finally:
        os.chdir(cwd)
    return results


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in VERSIONS}


def expected(golden: dict[str, Any], case: str) -> dict[str, str]:
    """The hashes ``case`` has on this machine: the reference, with this processor's own where recorded."""
    return {**golden["cases"][case], **golden.get("machines", {}).get(machine(), {}).get(case, {})}


if __name__ == "__main__" and sys.argv[1:] in (["record"], ["record-machine"]):
    import tempfile

    sys.path.insert(0, str(HERE.parent))  # run as a script: make ``support`` importable

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        build_fixtures(Path(tmp))
        hashes = run_cases(Path(tmp))
        found = {name: summaries(Path(tmp) / f"out-{name}") for name in hashes}
    if sys.argv[1] == "record":  # new reference bytes (after a reviewed change): other machines' entries are void
        GOLDEN.write_text(json.dumps({"versions": versions(), "cases": hashes, "machines": {}, "summaries": found},
                                     indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(map(len, hashes.values()))} files of {len(hashes)} cases in {GOLDEN}")
    else:  # this processor's bytes, where they differ from the reference by rounding only
        golden = json.loads(GOLDEN.read_text())
        assert golden["versions"] == versions(), "record-machine needs the versions the reference was recorded with"
        if "summaries" not in golden:  # a reference recorded before summaries existed: take them from this run
            golden["summaries"] = found
        own = {}
        for name, files in hashes.items():
            diff = {f: h for f, h in files.items() if golden["cases"][name].get(f) != h}
            if diff:
                assert name in LINALG, f"{name} differs on this machine and does not use LAPACK: a real change"
                problems = differences({f: golden["summaries"][name][f] for f in diff}, {f: found[name][f] for f in diff})
                assert not problems, f"{name} differs by more than rounding: {problems[:3]}"
                own[name] = diff
        golden.setdefault("machines", {})[machine()] = own
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(map(len, own.values()))} files of {len(own)} cases for {machine()} in {GOLDEN}")
