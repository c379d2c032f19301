"""Conversion time and peak memory on a Karlo-size random checkpoint, against diffusers loading the same folder.

    python benchmarks/convert_karlo.py [--workdir DIR] [--repeat 2]

The checkpoint is kakaobrain/karlo-v1-alpha's architecture at full size (3.4 billion parameters, 13.6 GB fp32)
with random weights, written by diffusers' own `UnCLIPPipeline.save_pretrained` (built once into --workdir,
~27 GB of disk with the converted copy). Each row runs in its own process; the parent samples the child's
/proc status every 20 ms: peak RSS, and peak anonymous memory (RSS minus file-backed pages, which are the
reclaimable page cache that memory-mapped reads leave mapped). Times are the best of --repeat runs, with the
files warm in the page cache where RAM allows.

Rows: `d2.convert` (diffusers folder -> model directory, streamed tensor by tensor), diffusers'
`UnCLIPPipeline.from_pretrained` (the peer's load into memory), and `d2.load_pipeline` of the converted
directory on PyTorch (our equivalent load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dalle2_portable.store import read_header

HERE = Path(__file__).resolve().parent

BUILD = """
import sys; sys.path.insert(0, {tests!r})
from pathlib import Path
from builders import KARLO, write_clip_vocab, write_tiny_karlo
root = Path({root!r})
write_tiny_karlo(root / "src.partial", write_clip_vocab(root / "vocab"), sizes=KARLO)
(root / "src.partial").rename(root / "src")
"""
# Both loaders memory-map safetensors and leave the pages untouched until first use; "+ touch" reads every
# weight once (as the first generation does), which pages the whole model in.
TOUCH = "; import torch; [float(p.float().sum()) for m in {modules} for p in m.parameters()]"
DIFFUSERS = ("import diffusers, logging; logging.disable(logging.WARNING); "
             "pipe = diffusers.UnCLIPPipeline.from_pretrained({src!r})")
OURS = "import dalle2_portable as d2; pipe = d2.load_pipeline({out!r}, backend='torch', device='cpu')"
ROWS = {
    "d2.convert (stream, fp32 out)": "import dalle2_portable as d2; d2.convert({src!r}, {out!r}, overwrite=True)",
    "diffusers UnCLIPPipeline.from_pretrained": DIFFUSERS,
    "diffusers UnCLIPPipeline.from_pretrained + touch": DIFFUSERS + TOUCH.format(
        modules="[c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]"),
    "d2.load_pipeline (converted, torch)": OURS,
    "d2.load_pipeline + touch": OURS + TOUCH.format(modules="pipe.components.values()"),
}
PEER = "diffusers UnCLIPPipeline.from_pretrained"


def largest_tensor_gb(folder: Path) -> tuple[str, float]:
    best = ("", 0)
    for f in folder.glob("*/*.safetensors"):
        for name, info in read_header(f).items():
            size = info.nbytes
            if size > best[1]:
                best = (f"{f.parent.name}/{name}", size)
    return best[0], best[1] / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dalle2-karlo-bench"))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    src, out = root / "src", root / "converted"
    if not (src / "model_index.json").is_file():
        print(f"writing a Karlo-size random checkpoint with diffusers into {src} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD.format(tests=str(HERE.parent / "tests"), root=str(root))],
                       check=True)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in src.rglob("*.safetensors")) / 2**30
    name, largest = largest_tensor_gb(src)
    print(f"checkpoint: {size:.2f} GiB of safetensors; largest tensor {name} = {largest:.3f} GiB\n")

    results = {}
    for label, template in ROWS.items():
        runs = []
        for _ in range(args.repeat):
            # ru_maxrss of RUSAGE_CHILDREN is a running maximum over all children, so each run gets its own
            # measuring process: a child that runs the row and reports its own child's peak.
            code = MEASURE.format(code=template.format(src=str(src), out=str(out)))
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{label} failed:\n{r.stderr[-3000:]}")
            runs.append(tuple(float(x) for x in r.stdout.split()))
        results[label] = (min(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs))

    peer = results[PEER]
    touched = results[PEER + " + touch"]
    print("| step | time (s) | peak RSS (GiB) | peak anonymous (GiB) | time / peer | RSS / peer | "
          "RSS / peer + touch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (t, rss, anon) in results.items():
        print(f"| {label} | {t:.1f} | {rss:.2f} | {anon:.2f} | {t / peer[0]:.2f} | {rss / peer[1]:.2f} | "
              f"{rss / touched[1]:.3f} |")


# Runs inside a fresh measuring process: start the row's process, sample its anonymous memory, report
# "seconds peak_rss_gib peak_anon_gib" (ru_maxrss of this process's only child is that child's peak).
MEASURE = """
import os, resource, subprocess, sys, time
from pathlib import Path
def status(pid):
    try:
        text = Path(f"/proc/{{pid}}/status").read_text()
    except OSError:
        return 0, 0
    vals = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    kb = lambda k: int(vals.get(k, "0 kB").split()[0])
    return kb("VmRSS"), kb("RssFile")
t0 = time.perf_counter()
proc = subprocess.Popen([sys.executable, "-c", {code!r}], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
peak_anon = 0
while proc.poll() is None:
    rss, file_backed = status(proc.pid)
    peak_anon = max(peak_anon, rss - file_backed)
    time.sleep(0.02)
seconds = time.perf_counter() - t0
if proc.returncode:
    sys.stderr.write(proc.stderr.read().decode()); sys.exit(1)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, peak_anon / 2**20)
"""


if __name__ == "__main__":
    main()
