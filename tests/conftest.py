"""Shared fixtures: tiny reference models built with transformers, placed in folders and in a local Hub cache.

Nothing here touches the network: HF_HUB_OFFLINE is set before huggingface_hub is imported, and every
checkpoint is made by the tests in the exact upstream layout (`save_pretrained`).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dalle2_portable.backends import installed  # noqa: E402

BACKENDS = installed()


def backend_params():
    """Parametrise a test over the installed backends (a missing one is reported as a skip with its reason)."""
    return [pytest.param(name, marks=pytest.mark.skipif(name not in BACKENDS, reason=f"{name} not installed"))
            for name in ("torch", "mlx")]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test converts into its own cache and sees an empty Hub cache unless it builds one."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("DALLE2_CACHE", str(root / "dalle2"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny Karlo, tiny Karlo-variations (diffusers folders and our conversions) and a tiny CLIP (~4 s)."""
    from builders import write_clip_vocab, write_tiny_clip, write_tiny_karlo

    import dalle2_portable as d2

    root = tmp_path_factory.mktemp("cascade")
    vocab = write_clip_vocab(root / "vocab")
    out = {"karlo_src": write_tiny_karlo(root / "karlo", vocab),
           "iv_src": write_tiny_karlo(root / "iv", vocab, variations=True),
           "clip": write_tiny_clip(root / "clip", vocab)}
    for name in ("karlo", "iv"):
        out[name] = root / f"{name}_converted"
        d2.convert(str(out[f"{name}_src"]), str(out[name]))
    return out


def assert_close_to_scale(actual, expected, rel: float, what: str = ""):
    """max |actual - expected| <= rel * max |expected| (the brief's "of the output's scale")."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"
    return err / scale


_PASSED = 0


def pytest_runtest_logreport(report):
    global _PASSED
    if report.when == "call" and report.passed:
        _PASSED += 1


def pytest_sessionfinish(session, exitstatus):
    """A run in which nothing passed (nothing collected, or everything skipped) is a failure, not a pass."""
    if exitstatus == 0 and _PASSED == 0:
        session.exitstatus = 1
