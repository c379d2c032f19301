"""Which components are in memory: every one from the start (the default), or with `low_memory` each one only
while a stage runs it.

`Components` is the {name: module} mapping a Pipeline and its CLIP hold. Eager, it loads every component when
it is made, as before. With low_memory=True it loads a component at its first use and drops it at `release`
(the pipeline releases at each stage boundary: text encoder, prior, text_proj + decoder, each upsampler), so a
cascade's peak is its largest stage, not the sum. Loading stays cheap: float32 safetensors are memory-mapped
on torch (pages read as the first step touches them) except the conv kernels, copied channels-last on the CPU,
and a float16 / bfloat16 model is read one tensor at a time (each mapping closed after its copy); what a
component costs to load again is measured in benchmarks/cascade.py.

With low_memory on Linux, glibc's malloc is also told to give every block of 1 MiB or more its own mapping
(`return_freed_memory`): by default it raises that threshold (up to 32 MiB) each time such a block is freed, and
from then on serves the UNets' activations of a few MiB from its heap, which it keeps; in a bfloat16 Karlo
cascade that kept 0.8 GiB (peak RSS 3.12 GiB, 2.29 with the threshold fixed; benchmarks/cascade.py).

`Deferred` stands in for a module inside a loop without holding it: the super-res loop gets one for
super_res_first and one for super_res_last, which at its first call (the last step) releases the first and
loads its own, so the two upsamplers are never in memory together.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import store


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc's malloc map every block of `threshold` bytes or more on its own, so that freeing it returns
    it to the system (and stop its dynamic threshold from growing). Once per process; False where the C library
    is not glibc (macOS's and musl's allocators do not need it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


class Components(Mapping):
    """{component name: module}, each loaded by `load(name)`: all at once, or (low_memory) each at first use."""

    def __init__(self, names: Iterable[str], load: Callable[[str], Any], low_memory: bool = False,
                 free: Callable[[], None] = lambda: None):
        self.names, self._load, self.low_memory, self._free = list(names), load, bool(low_memory), free
        self._held: dict[str, Any] = {}
        self._pinned: set[str] = set()  # put there from outside: never released
        if not self.low_memory:
            for name in self.names:
                self._held[name] = load(name)
        else:
            return_freed_memory()

    def __getitem__(self, name: str):
        if name not in self._held:
            if name not in self.names:
                raise KeyError(name)
            self._held[name] = self._load(name)
        return self._held[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:  # without loading it
        return name in self.names

    @property
    def held(self) -> list[str]:
        """The components in memory now."""
        return [n for n in self.names if n in self._held]

    def joined(self, name: str, module) -> Components:
        """A copy that also holds the loaded `module` as `name` (another model's CLIP tower), never released
        there; this mapping is left as it is."""
        other = copy.copy(self)
        other.names = self.names + [name] * (name not in self.names)
        other._held, other._pinned = {**self._held, name: module}, self._pinned | {name}
        return other

    def release(self, keep: Iterable[str] = ()) -> None:
        """low_memory: drop every held component but `keep` (and pinned ones), then let the backend return the
        memory; eager: nothing."""
        if not self.low_memory:
            return
        keep = set(keep) | self._pinned
        dropped = [n for n in self._held if n not in keep]
        for name in dropped:
            del self._held[name]
        if dropped:
            self._free()


def load_module(backend, model_dir, spec, name: str, prepare: Callable[[str, Any], None] | None = None):
    """Component `name` of the model directory on `backend` (the caller validated its file), then
    `prepare(name, module)` if given."""
    comp = spec.components[name]
    path = str(store.component_path(model_dir, spec, name))
    module = (backend.load_component(comp.type, comp.config, path) if comp.quantization is None
              else backend.load_component(comp.type, comp.config, path, quantization=comp.quantization))
    if prepare is not None:
        prepare(name, module)
    return module


class Deferred:
    """A module stand-in that holds no module: called, it releases `replaces` from `components`, then calls
    `components[name]` (loaded at its first call). Backends call modules as `module(*arrays)`, so it passes as
    one. A loop given stand-ins for both of a stage's UNets keeps no reference to either, so releasing one
    frees it while the loop runs on."""

    def __init__(self, components: Components, name: str, replaces: Iterable[str] = ()):
        self.components, self.name, self.replaces = components, name, set(replaces)

    def __call__(self, *args, **kwargs):
        if self.replaces:
            self.components.release(keep=set(self.components.held) - self.replaces)
        return self.components[self.name](*args, **kwargs)
