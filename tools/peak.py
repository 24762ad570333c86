"""Measured one-core peak multiply-accumulate rates (GMAC/s) of this CPU.

    python -m tools.peak            # prints JSON: fp32 FMA and int8 dot-product peaks

Builds tools/peak.c with the system C compiler (-O2 -march=native) and runs it pinned to one
core. int8 figures: AMX ``tdpbusd`` (tile data permission requested), VNNI ``vpdpbusd`` on
zmm and ymm where the CPU has them; on AVX2, the int16-widened
``vpmaddwd`` path (exact for any u8 x s8) and the ``vpmaddubsw`` + ``vpmaddwd`` path (exact
where pairs of products fit int16, e.g. 7-bit activations: what fbgemm, oneDNN and ONNX
Runtime run on AVX2). Benchmarks take the best int8 figure as the int8 peak.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("peak.c")


def measure(iterations: int = 50_000_000) -> dict[str, float]:
    """Returns {kernel: GMAC/s} measured on one core."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH: tools.peak builds a small C kernel")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peak"
        subprocess.run([cc, "-O2", "-march=native", str(SOURCE), "-o", str(exe)], check=True)
        cmd = [str(exe), str(iterations)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[0]), *cmd]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {k: v / 1e9 for k, v in json.loads(out).items()}


def main() -> int:
    print(json.dumps({k: round(v, 2) for k, v in measure().items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
