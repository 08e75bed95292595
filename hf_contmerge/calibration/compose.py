"""Forward passes with substituted weights, under Accelerate device maps, in bounded memory.

Data-dependent methods run a model whose weights are not (only) its own parameters: the Fisher
taps each weight to catch its gradient, DivMerge and TRM compose each weight from an anchor and
directions with learned coefficients. :func:`substituted` does both the same way: while a module's
forward runs, each of its float parameters ``p`` (by canonical name, tied parameters once) is
replaced by ``substitute(name, p)`` — any tensor, typically a function of ``p`` in the autograd
graph — and restored when the forward returns.

Under an Accelerate device map a module's weights exist only during its forward: the hook loads
them onto the execution device before (``pre_forward``) and drops them to ``meta`` after. The
substitution therefore happens inside the hook, around ``_old_forward``, where they are loaded.
What autograd saves for the backward pass would keep every offloaded weight alive until then (a
whole model in RAM). So, while an offloaded module runs, the storage of each weight it loaded is
registered, and a ``saved_tensors_hooks`` pair packs a saved tensor on such a storage as a way to
reload it (the hook's ``weights_map``, as ``pre_forward`` does) and rebuilds it in the backward
pass. A substitute may register its own result the same way (``recompute``), so a composed weight
is rebuilt rather than kept. Hand-written because neither Accelerate nor torch offers it:
``torch.func.functional_call`` replaces parameters for a whole call, which Accelerate's hooks would
overwrite, and torch's CPU-offload saved-tensor hooks keep a full copy in RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

Substitute = Callable[[str, Tensor], Tensor | None]


@dataclass
class Substitution:
    """The live state of :func:`substituted`: storages that saved tensors are rebuilt from."""

    rebuild: dict[int, Callable[[], Tensor]] = field(default_factory=dict)  # storage pointer -> its tensor, again

    def recompute(self, tensor: Tensor, again: Callable[[], Tensor]) -> None:
        """Saved copies of ``tensor`` (during the current module's forward) are rebuilt by ``again()``."""
        self.rebuild[_storage(tensor)] = again


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _reload(hook, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    return hook.weights_map[name].to(device=device, dtype=dtype)


@contextmanager
def substituted(model: nn.Module, substitute: Substitute, rebuild_saved: bool = False) -> Iterator[Substitution]:
    """Run ``model``'s forwards with ``substitute`` applied to its float parameters (module docstring).
    Saved tensors are packed when a module is offloaded, or always with ``rebuild_saved`` (for
    substitutes that register what they compose with :meth:`Substitution.recompute`)."""
    from accelerate.utils import named_module_tensors

    state = Substitution()
    canonical = {id(p): n for n, p in model.named_parameters()}
    offloading = False
    with ExitStack() as undo:
        for path, module in model.named_modules():
            own = [(local, canonical.get(id(p), f"{path}.{local}" if path else local))
                   for local, p in module._parameters.items() if p is not None]
            hook = getattr(module, "_hf_hook", None) if hasattr(module, "_old_forward") else None
            offloaded = bool(getattr(hook, "offload", False))
            if not own and not offloaded:
                continue
            offloading |= offloaded

            def call(*args, _inner, _module=module, _own=own, _hook=hook if offloaded else None, **kwargs):
                registered = []
                if _hook is not None:  # the weights pre_forward just loaded: saved copies are reloaded, not kept
                    for name, t in named_module_tensors(_module, include_buffers=_hook.offload_buffers,
                                                        recurse=_hook.place_submodules):
                        if t.device.type != "meta" and t.is_floating_point():
                            state.rebuild[_storage(t)] = partial(_reload, _hook, name, t.device, t.dtype)
                            registered.append(_storage(t))
                swapped = {}
                for local, name in _own:
                    p = _module._parameters[local]
                    if p is None or p.device.type == "meta" or not p.is_floating_point():
                        continue
                    value = substitute(name, p)
                    if value is not None:
                        swapped[local] = p
                        _module._parameters[local] = value
                try:
                    return _inner(*args, **kwargs)
                finally:
                    for local, p in swapped.items():
                        made = _storage(_module._parameters[local])
                        if made != _storage(p):  # a tensor of the substitute's own (its recompute, if registered)
                            registered.append(made)
                        _module._parameters[local] = p
                    for ptr in registered:
                        state.rebuild.pop(ptr, None)

            if hook is not None:  # inside Accelerate's hook: the weights are loaded here
                inner = module._old_forward
                module._old_forward = partial(call, _inner=inner)
                undo.callback(setattr, module, "_old_forward", inner)
            else:
                had = "forward" in module.__dict__
                inner = module.forward
                module.forward = partial(call, _inner=inner)
                undo.callback(setattr, module, "forward", inner) if had else undo.callback(module.__dict__.pop, "forward")

        if offloading or rebuild_saved:
            def pack(t: Tensor):
                try:
                    again = state.rebuild.get(_storage(t))
                except RuntimeError:  # a tensor without storage
                    return t
                return t if again is None else (again, t.size(), t.stride(), t.storage_offset())

            def unpack(packed):
                if isinstance(packed, tuple):
                    again, size, stride, offset = packed
                    return torch.as_strided(again(), size, stride, offset)
                return packed

            undo.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        yield state


def home_tensors(model: nn.Module, folder: Path | None) -> Callable[..., Tensor]:
    """``zeros(name, shape, dtype=float32)``: a zero tensor for parameter ``name`` where the model keeps
    it: its own device without a device map; under one, the device the map gives its module (a GPU,
    the CPU), or for ``disk`` a zero-filled file in ``folder`` mapped as a tensor (shared, so what is
    written goes to the file and RAM holds only the pages in use). Without ``folder``, disk ones are
    in CPU RAM."""
    device_map: Mapping[str, int | str] = getattr(model, "hf_device_map", None) or {}
    params = dict(model.named_parameters())
    made = 0

    def zeros(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        nonlocal made
        module = max((m for m in device_map if m == "" or name == m or name.startswith(m + ".")), key=len, default=None)
        place = device_map[module] if module is not None else None
        numel = torch.Size(shape).numel()
        if place == "disk" and folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            made += 1
            path = folder / f"{made}.bin"
            return torch.from_file(str(path), shared=True, size=max(1, numel), dtype=dtype)[:numel].view(shape)
        if place is None:
            device = params[name].device if name in params and params[name].device.type != "meta" else torch.device("cpu")
        else:
            device = torch.device("cpu") if place in ("cpu", "disk") else torch.device(f"cuda:{place}" if isinstance(place, int) else place)
        return torch.zeros(shape, dtype=dtype, device=device)

    return zeros
