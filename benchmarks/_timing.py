"""Timing helpers shared by the benchmarks (median of repeats, compile excluded)."""

from __future__ import annotations

import platform
import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn(*args) (blocking on JAX outputs) over `repeats` runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_seconds(jitted, *args) -> float:
    """Trace + compile time of a jitted function for these argument shapes."""
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def cpu_line() -> str:
    """The CPU model, whether it has AVX-512 (ratios against torch move with it) and the core count."""
    import os

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model name from platform only
        pass
    avx = "AVX-512" if "avx512f" in flags else ("no AVX-512" if flags else "AVX-512 unknown")
    if "amx_tile" in flags:
        avx += " + AMX"
    return f"{model} ({avx}), {os.cpu_count()} cores"


def machine_line() -> str:
    """CPU (AVX-512 or not), date, Python / jax / numpy versions and the JAX device: beside every figure."""
    import datetime
    import sys

    import numpy as np

    devs = jax.devices()
    return (
        f"{cpu_line()}, {datetime.date.today().isoformat()}, Python {sys.version.split()[0]}, "
        f"jax {jax.__version__}, numpy {np.__version__}, on {devs[0].platform} ({devs[0].device_kind})"
    )


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables `print_table` printed into `text` (the smoke tests read them)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|-"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(f"\n{title}\n")
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def reset_peak_rss() -> bool:
    """Resets this process's peak resident memory (Linux: VmHWM, via /proc/self/clear_refs).

    Lets a benchmark report the peak of its steps apart from earlier phases (XLA's compiler
    peaks higher than the step it compiles). False where the kernel does not offer it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory (MiB) since the process started or `reset_peak_rss` (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
