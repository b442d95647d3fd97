"""`ModelConfig.cpu_kernels`: which kernels XLA:CPU compiles the model's programs with.

    "default"       XLA:CPU's defaults. Since jax 0.12 these run convolutions and matrix
                    products as YNNPACK fusions.
    "ynnpack_dots"  YNNPACK for matrix products (with the elementwise work around them)
                    only (`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT`,
                    float32 at full precision); convolutions run on XLA's own (Eigen)
                    kernels, 2.5-3x faster than YNNPACK's on the development CPU.

The setting is two things that must agree: the compile options below, which every
`jax.jit` of the model passes (the training step, evaluation, `Detector`), and the conv
lowering the model traces (`conv._cpu_lowering`: the fastest per shape depends on the
kernels). Off CPU the options are empty and the lowering is XLA's convolution either way.
"""

from __future__ import annotations

import jax

CPU_KERNEL_OPTIONS = {
    "default": {},
    "ynnpack_dots": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}
CPU_KERNELS = tuple(CPU_KERNEL_OPTIONS)


def compiler_options(cpu_kernels: str) -> dict[str, str]:
    """The XLA compile options that select `cpu_kernels` on the current backend ({} off CPU)."""
    if cpu_kernels not in CPU_KERNEL_OPTIONS:
        raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {cpu_kernels!r}")
    return dict(CPU_KERNEL_OPTIONS[cpu_kernels]) if jax.default_backend() == "cpu" else {}
