"""The unCLIP pipeline: one model directory's components loaded on one backend.

    pipe = d2.load_pipeline(model="kakaobrain/karlo-v1-alpha")   # Hub id: downloaded + converted once, cached
    pipe.components        # {"text_encoder": ..., "prior": ..., "text_proj": ..., "decoder": ..., ...}

This module orchestrates only: the components are the backend's modules, the CLIP towers come through `CLIP`,
and sampling lives in `sampling.py` (the generation verbs build on this class).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import store
from .backends import Backend, get_backend
from .clip import CLIP
from .errors import Dalle2Error
from .spec import ModelSpec

UNCLIP_COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
REQUIRED = ("text_encoder", "text_proj", "decoder")  # the least an unCLIP model has (variations have no prior)


class Pipeline:
    """The components of an unCLIP model directory on one backend, validated before anything is allocated."""

    def __init__(self, model_dir: str | os.PathLike, backend: Backend, spec: ModelSpec | None = None):
        self.model_dir = Path(model_dir)
        self.spec = spec or store.read_spec(self.model_dir)
        self.backend = backend
        missing = [n for n in REQUIRED if n not in self.spec.components]
        if missing:
            raise Dalle2Error(f"model {str(self.model_dir)!r} has no {missing[0]}, so it is not an unCLIP model; "
                              "CLIP models load with d2.load_clip")
        parts = [n for n in UNCLIP_COMPONENTS if n in self.spec.components]
        store.validate(self.model_dir, self.spec, backend.parameter_shapes, parts)  # CLIP validates its towers
        self.clip = CLIP(self.model_dir, backend, self.spec)
        self.modules = {}
        for name in parts:
            comp = self.spec.components[name]
            path = store.component_path(self.model_dir, self.spec, name)
            self.modules[name] = backend.load_component(comp.type, comp.config, str(path))

    @property
    def components(self) -> dict:
        """Every loaded module by component name, the CLIP towers included."""
        return {**self.clip.modules, **self.modules}

    @property
    def schedulers(self):
        return self.spec.schedulers

    @property
    def defaults(self) -> dict:
        return self.spec.defaults

    def __repr__(self) -> str:
        return f"Pipeline({str(self.model_dir)!r}, {self.backend!r}, components={list(self.components)})"


def load_pipeline(model: str | os.PathLike = "default", backend: str | Backend = "auto", device: str | None = None,
                  dtype: str = "float32", revision: str | None = None, variant: str | None = None) -> Pipeline:
    """An unCLIP pipeline from a model directory, a Hub repo id or a local diffusers folder (both converted once,
    then reused from the cache). `variant` reads variant weight files of the source (e.g. "fp16")."""
    from .convert import resolve_model

    if str(model) == "default":
        raise Dalle2Error("this version embeds no default model yet; pass a Hub repo id such as "
                          "kakaobrain/karlo-v1-alpha or a model directory")
    model_dir = resolve_model(model, revision=revision, variant=variant)
    return Pipeline(model_dir, get_backend(backend, device=device, dtype=dtype))
