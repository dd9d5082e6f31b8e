"""Static look at the M = 1 GEMV kernels' machine code: no GPU needed, only nvcc and cuobjdump.

Compiles qat/kernels/csrc/bitgemm.cu for one architecture, disassembles it, finds each kernel's
main loop (its largest backward branch) and prints the loop's instruction count per weight it
processes per iteration, with the opcode mix. Both sides of a loop's branches are counted (for
example the lookup-table kernel's full-chunk and last-chunk paths), so the figures are upper
bounds on the instructions a lane issues per weight; they compare kernels, not predict speed.
Writes benchmarks/results/sass-loops-sm<arch>-<date>.json.

  python benchmarks/sass_loops.py [--arch 90]     (or `make sass`, which installs cuobjdump + nvdisasm)
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.kernels.build import CSRC, nvcc_path

# kernel (mangled-name fragment, M = 1, no salient part, one scale per row) -> weights per lane per loop iteration
KERNELS = {
    "signflip_R1": ("binary_gemv_kernelILi1ELi1ELi4ELi0Eh", 1 * 4 * 32),  # R rows x VEC words x 32
    "signflip_R2": ("binary_gemv_kernelILi1ELi2ELi4ELi0Eh", 2 * 4 * 32),
    "signflip_R4": ("binary_gemv_kernelILi1ELi4ELi4ELi0Eh", 4 * 4 * 32),
    "lut_S4": ("binary_gemv_lut_kernelILi4ELi0EhLb0", 16 * 32),          # WPS words x 32
    "lut_S8": ("binary_gemv_lut_kernelILi8ELi0EhLb0", 8 * 32),
}
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def cuobjdump_path() -> str | None:
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import nvidia
    except ImportError:
        return None
    found = [p for d in nvidia.__path__ for p in Path(d).glob("cu*/bin/cuobjdump")]
    return str(found[0]) if found else None


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the instructions between the function's widest backward branch and its target."""
    code = [(int(a, 16), op, rest) for a, op, rest in LINE.findall(sass)]
    best: tuple[int, int] | None = None
    for addr, op, rest in code:
        m = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    if best is None:
        return collections.Counter()
    return collections.Counter(op for addr, op, _ in code if best[0] <= addr <= best[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="90")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    nvcc, objdump = nvcc_path(), cuobjdump_path()
    if nvcc is None or objdump is None:
        sys.exit("needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "bitgemm.cubin"
        subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", f"-arch=sm_{args.arch}", "-I", str(CSRC),
                        "-o", str(cubin), str(CSRC / "bitgemm.cu")], check=True)
        env = {**os.environ, "PATH": f"{Path(objdump).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its nvdisasm
        sass = subprocess.run([objdump, "-sass", str(cubin)], check=True, capture_output=True, text=True,
                              env=env).stdout
    functions = {f.split("\n", 1)[0]: f for f in re.split(r"\n\s*Function : ", sass)[1:]}
    rows = []
    for label, (fragment, weights) in KERNELS.items():
        body = next((f for name, f in functions.items() if fragment in name), None)
        if body is None:
            sys.exit(f"kernel {fragment} not found in the disassembly")
        ops = main_loop(body)
        n = sum(ops.values())
        rows.append({"kernel": label, "loop_instructions": n, "weights_per_iteration": weights,
                     "instructions_per_weight": n / weights, "opcodes": dict(ops.most_common(10))})
        print(f"{label:12s} loop {n:5d} instructions / {weights:4d} weights = {n / weights:4.2f} per weight   "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(6)))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sass-loops-sm{args.arch}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"benchmark": "sass_loops", "arch": f"sm_{args.arch}", "nvcc": version, "commit": commit(),
                                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "note": "static upper bounds: both sides of in-loop branches counted",
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
