"""Run the test suite as it runs on a CPU without AVX-512, VNNI or AMX (an AMD EPYC, say).

    .venv/bin/python scripts/test_on_avx2.py [--no-write] [PYTEST ARGS...]   # default: tests/

Issue 17 asks that `make test` pass on every x86-64 CPU, and onnxruntime's int8 kernels differ
between CPUs with and without VNNI. This machine can pose as an AVX2-only CPU: the LD_PRELOAD
library of ``scripts/bench_portability.py`` turns on Linux CPUID faulting and hides AVX-512,
AVX-VNNI and AMX from every CPUID the test processes (and every process they start) execute,
so onnxruntime, numpy and FAISS pick the kernels they would pick on such a CPU. Only Python
processes are disguised (``AVX2ONLY_EXE=python``): nginx, Prometheus, Chromium and Node.js, which
some tests start, install SIGSEGV handlers of their own and run natively. The script
checks that the disguise holds (numpy reports no AVX-512 under it), runs pytest under it and
writes the result into the ``reliability-avx2-suite`` section of docs/RELIABILITY.md.

pytest's faulthandler plugin is turned off under the shim: it installs its own SIGSEGV handler,
and the shim needs SIGSEGV to answer the faulting CPUID instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_portability
import benchlib

ROOT = benchlib.ROOT
DOC = ROOT / "docs" / "RELIABILITY.md"
PROBE = (
    "import numpy as np\n"
    "from numpy._core._multiarray_umath import __cpu_features__ as f\n"
    "print(int(f.get('AVX512F', False)), int(f.get('AVX2', False)))\n"
)


def cpu_features(env: dict[str, str]) -> tuple[bool, bool]:
    """(AVX-512F, AVX2) as numpy sees them in a process started with ``env``."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "1", out[1] == "1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args, pytest_args = parser.parse_known_args()
    pytest_args = pytest_args or ["tests"]
    native = cpu_features(dict(os.environ))
    machine = benchlib.machine()  # load and time at the start
    with tempfile.TemporaryDirectory(prefix="semroute-avx2-") as tmp:
        shim = bench_portability.build_shim(Path(tmp))
        if shim is None:
            return 2
        # Only Python processes are disguised: the Go (nginx exporter, Prometheus), Chromium
        # and Node.js binaries some tests start have signal handlers of their own.
        env = dict(os.environ, LD_PRELOAD=str(shim), AVX2ONLY_EXE="python")
        env.pop("PYTHONFAULTHANDLER", None)
        disguised = cpu_features(env)
        print(f"numpy sees AVX-512F={native[0]} AVX2={native[1]} natively, "
              f"AVX-512F={disguised[0]} AVX2={disguised[1]} under the shim")
        if disguised[0] or not disguised[1]:
            print("error: the shim does not hide AVX-512 here; not an AVX2-only run",
                  file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-p", "no:faulthandler", *pytest_args]
        started = time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        minutes = (time.perf_counter() - started) / 60
    sys.stdout.write(proc.stdout[-6000:])
    sys.stderr.write(proc.stderr[-3000:])
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed)", line)), "no pytest summary")
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    body = "\n".join([
        "## The test suite on an AVX2-only CPU",
        "",
        f"`.venv/bin/python scripts/test_on_avx2.py {' '.join(pytest_args)}` "
        f"({machine}; {bench_portability.cpu_model()}): pytest under the Portability section's "
        "CPUID shim (its Python processes; the nginx, Prometheus, Chromium and Node.js it starts "
        f"run natively), numpy reporting AVX-512F={disguised[0]}, "
        f"AVX2={disguised[1]} inside it (natively AVX-512F={native[0]}). {minutes:.1f} min.",
        "",
        f"- result: **{summary.strip('= ')}** (exit code {proc.returncode})",
        *(f"- {line}" for line in failures[:20]),
    ])
    print(body)
    if not args.no_write:
        benchlib.write_section("reliability-avx2-suite", body, doc=DOC, header="")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
