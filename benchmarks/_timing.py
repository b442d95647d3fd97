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


def machine_line() -> str:
    import os

    devs = jax.devices()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {devs[0].platform} ({devs[0].device_kind})"
    )


def print_table(title: str, header: list[str], rows: list[list[str]]):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(f"\n{title}\n")
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
