"""Pieces the benchmarks share: the machine's description, a process's peak resident memory, the matmul peak.

Import from a benchmark script with `sys.path.insert(0, str(HERE))` (benchmarks/ is not a package), as
train_speed.py imports generate_speed's SMALL.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS), in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def memory_gib() -> float | None:
    """The machine's physical memory in GiB (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def versions(*packages: str) -> dict[str, str | None]:
    """{package: installed version or None}, read without importing the packages."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def torch_matmul_gflops(device: str = "cpu", dtype: str = "float32", sizes=None, repeat: int = 5) -> dict:
    """The best GFLOP/s of an n x n @ n x n torch matmul over `sizes` (best of `repeat` each, after one warm-up):
    the ceiling a step's achieved FLOP/s is measured against. A CPU: n = 1024, 1536, 2048, one product per
    timing; CUDA: n = 2048, 4096, 8192, ten products between synchronisations (a single small one measures the
    launch). -> {"gflops", "n", "device", "dtype"}."""
    import torch

    dt = getattr(torch, dtype)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sizes, per = (sizes or ((2048, 4096, 8192) if cuda else (1024, 1536, 2048))), (10 if cuda else 1)
    best, best_n = 0.0, None
    for n in sizes:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device, dt)
        b = torch.randn(n, n, generator=g).to(device, dt)
        a @ b
        sync()
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(per):
                a @ b
            sync()
            gflops = per * 2 * n**3 / (time.perf_counter() - t) / 1e9
            if gflops > best:
                best, best_n = gflops, n
    return {"gflops": best, "n": best_n, "device": device, "dtype": dtype}


def mlx_matmul_gflops(dtype: str = "float32", sizes=(1024, 1536, 2048), repeat: int = 5) -> dict:
    """As torch_matmul_gflops, on MLX's default device (with the BLAS our MLX backend loads)."""
    from dalle2_portable.backends import mlx as mlx_backend  # first: it preloads OpenBLAS where it can

    import mlx.core as mx

    best, best_n = 0.0, None
    for n in sizes:
        a = mx.random.normal((n, n), key=mx.random.key(0)).astype(getattr(mx, dtype))
        b = mx.random.normal((n, n), key=mx.random.key(1)).astype(getattr(mx, dtype))
        mx.eval(a, b)
        mx.eval(a @ b)
        for _ in range(repeat):
            t = time.perf_counter()
            mx.eval(a @ b)
            gflops = 2 * n**3 / (time.perf_counter() - t) / 1e9
            if gflops > best:
                best, best_n = gflops, n
    blas = "OpenBLAS" if mlx_backend.OPENBLAS_LOADED else "bundled BLAS"
    return {"gflops": best, "n": best_n, "device": str(mx.default_device()), "dtype": dtype, "blas": blas}


def git_commit(repo: Path) -> str | None:
    """The checkout's HEAD commit (short), with "+changes" when its tracked files differ from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


class AnonymousPeak:
    """Samples this process's anonymous resident memory (RssAnon in /proc/self/status: RSS less file-backed
    pages, i.e. less the memory-mapped weights the kernel can drop and read again) every `interval` seconds in a
    daemon thread; `.peak` in GiB, None where /proc is not there (macOS). ru_maxrss counts both kinds."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak, self._path = None, Path("/proc/self/status")
        if not self._path.exists():
            return
        self.peak, self._interval = 0.0, interval
        threading.Thread(target=self._run, daemon=True).start()

    def sample(self) -> float | None:
        if self.peak is None:
            return None
        for line in self._path.read_text().splitlines():
            if line.startswith("RssAnon:"):
                self.peak = max(self.peak, int(line.split()[1]) / 2**20)
        return self.peak

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(self._interval)
