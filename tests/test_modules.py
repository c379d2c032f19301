"""The one-definition contract: every facade has every name the components use, the built trees are native
framework modules (and instances of the backend-neutral class), the neutral packages import no framework, and
native tools (mx.compile, torch's autograd through a built tree) work on them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKENDS, assert_close_to_scale, backend_params

import dalle2_portable
from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.modules import FACADE, building
from dalle2_portable.modules.prior import PriorTransformer, prior_attention_mask
from dalle2_portable.spec import PriorConfig

PACKAGE = Path(dalle2_portable.__file__).parent
PRIOR = PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=7,
                    time_embed_dim=16, embedding_proj_dim=16, clip_embed_dim=16)


@pytest.mark.parametrize("backend", backend_params())
def test_facade_defines_every_name(backend):
    facade = get_backend(backend).facade
    missing = [n for names in FACADE.values() for n in names if not hasattr(facade, n)]
    assert not missing, f"{backend} facade lacks {missing}"


def _framework_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    return [n for n in names if n.split(".")[0] in ("torch", "mlx")]


def test_neutral_code_imports_no_framework():
    """Only backends/<name>/ imports a framework (convert/ may import torch inside the .bin reader)."""
    neutral = [p for p in PACKAGE.rglob("*.py") if "backends" not in p.parts and "convert" not in p.parts]
    assert any(p.parent.name == "modules" for p in neutral) and any(p.parent.name == "train" for p in neutral)
    offenders = {str(p.relative_to(PACKAGE)): _framework_imports(p) for p in neutral if _framework_imports(p)}
    assert not offenders


@pytest.mark.parametrize("backend", backend_params())
def test_built_trees_are_native_modules(backend):
    b = get_backend(backend)
    module = b.build("prior", PRIOR)
    native_base = b.facade.Module
    assert isinstance(module, PriorTransformer) and isinstance(module, native_base)
    assert type(module).__name__ == "PriorTransformer" and type(module).__module__ == PriorTransformer.__module__
    children = [module.transformer_blocks[0], module.transformer_blocks[0].attn1, module.time_embedding]
    assert all(isinstance(c, native_base) for c in children)
    # a second build reuses the same twin classes
    assert type(b.build("prior", PRIOR)) is type(module)


def test_neutral_class_outside_a_backend_is_one_line():
    with pytest.raises(Dalle2Error, match="backend-neutral; build it through a backend"):
        PriorTransformer(PRIOR)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_twins_per_facade_are_distinct():
    torch_facade, mlx_facade = get_backend("torch").facade, get_backend("mlx").facade
    with building(torch_facade):
        a = PriorTransformer(PRIOR)
    with building(mlx_facade):
        b = PriorTransformer(PRIOR)
    assert type(a) is not type(b) and type(a).__name__ == type(b).__name__


def _prior_inputs(rng):
    mask = np.ones((2, PRIOR.num_embeddings), bool)
    mask[1, 4:] = False
    return (rng.standard_normal((2, 16), dtype=np.float32), np.int64(17),
            rng.standard_normal((2, 16), dtype=np.float32),
            rng.standard_normal((2, PRIOR.num_embeddings, 16), dtype=np.float32), prior_attention_mask(mask))


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx not installed")
def test_mx_compile_runs_the_tree():
    import mlx.core as mx

    b = get_backend("mlx")
    module = b.build("prior", PRIOR)
    inputs = _prior_inputs(np.random.default_rng(0))
    (eager,) = b.run(module, *inputs)
    compiled = mx.compile(lambda *a: module(*a))
    out = np.array(compiled(*b.arrays(inputs)))
    assert_close_to_scale(out, eager, 1e-6, "mx.compile vs eager")
