"""ResNet with frozen batch norm, NHWC, parameter names mirroring torchvision.

The module tree is named like torchvision's `ResNet` (`conv1`, `bn1`, `layer1`...,
blocks `"0"`, `"1"`, ... with `conv1..3`, `bn1..3`, `downsample_0/1`), so a
torchvision state dict maps onto it key by key (see `frcnn_jax.convert`).

Frozen batch norm keeps torchvision's four buffers (weight, bias, running_mean,
running_var) in the `"frozen"` variable collection: they are constants, never
trained, and computed as torchvision's `FrozenBatchNorm2d` does:
`x * (w * rsqrt(var + eps)) + (b - mean * w * rsqrt(var + eps))`.

Rematerialisation (`ModelConfig.remat`, see `config.REMAT_PARTS`): with `remat=True`
every trained residual block is a `remat_call`: the backward pass keeps only each
block's input and recomputes the block's convolutions, batch norms and relus.
Parameter names and inference results do not change.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.modeling.conv import Conv

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm(nn.Module):
    """Per-channel affine from frozen BN statistics. x: [..., C] -> [..., C]."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.variable("frozen", "weight", jnp.ones, (c,), jnp.float32).value
        bias = self.variable("frozen", "bias", jnp.zeros, (c,), jnp.float32).value
        mean = self.variable("frozen", "running_mean", jnp.zeros, (c,), jnp.float32).value
        var = self.variable("frozen", "running_var", jnp.ones, (c,), jnp.float32).value
        scale = weight * jax.lax.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def conv(
    features: int, kernel: int, stride: int = 1, *, name: str, dtype, use_bias: bool = False, kernel_init=None,
    cpu_kernels: str = "default",
):  # fmt: skip
    """A torch-style conv: symmetric padding kernel // 2, HWIO kernel, no bias by default."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
    return Conv(features, kernel, stride, use_bias=use_bias, dtype=dtype, name=name, cpu_kernels=cpu_kernels, **kwargs)


def _after(xs, g):
    """`xs` (a pytree of arrays), made data-dependent on the cotangent `g`.

    Adds `min(|g[0]|, 0)`: exactly 0 for every finite or infinite cotangent (NaN stays
    NaN, as the gradient would be), but not a constant XLA can fold away. Costs one
    elementwise pass over `xs` in the backward pass.
    """
    first = jax.tree.leaves(g)[0].ravel()[0]
    zero = jnp.minimum(jnp.abs(first), 0)
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), xs)


def remat_call(module: nn.Module, *args):
    """`module(*args)`, rematerialised: the backward pass recomputes it from its inputs.

    The forward pass keeps only `args` (and the module's variables, which are live
    anyway); the backward pass re-runs `module`'s forward and its VJP on them. Values
    and gradients equal `module(*args)`'s; parameter names do not change (the module
    is called in its own scope); without differentiation it is a plain call.

    Why not `jax.checkpoint` / `flax.linen.remat`: on XLA:CPU its `prevent_cse`
    optimisation barriers are removed early in compilation (`cse_barrier_expander`),
    after which the post-fusion CSE merges the recomputation back into the forward
    pass and the concurrency-optimised scheduler hoists what is left there: the R-50-FPN
    step's peak memory does not change at all (XLA temp buffers 6.09 GB at 800x1344
    for "none", "backbone" and "all" alike under `flax.linen.remat`). Here the
    recomputation's inputs are tied to the incoming cotangent (`_after`), a true data
    dependency no compiler pass removes, so it can neither be merged with the forward
    pass nor run before the backward pass reaches it. The same holds on GPU/TPU. (Being a `custom_vjp`, it has
    no second derivative; training needs none.)

    Args:
      module: an unbound child module of the calling compact module (named as usual).
      args: its array (pytree) arguments.
    """
    definition = module.clone(parent=None)  # unbound copy to re-run in the backward pass

    def call(mdl, *xs):
        return mdl(*xs)

    def forward(mdl, *xs):
        return mdl(*xs), (mdl.variables, xs)

    def backward(residuals, g):
        variables, xs = residuals
        params = variables.get("params", {})

        def apply(p, *xs_):
            return definition.apply({**variables, "params": p}, *xs_)

        _, vjp = jax.vjp(apply, params, *_after(xs, g))
        params_t, *xs_t = vjp(g)
        return ({"params": params_t}, *xs_t)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, *args)


def remat_switch(module: nn.Module, index_fn, branches, *args):
    """`nn.switch(index_fn(*args), branches, module, *args)`, each branch rematerialised.

    Differentiated directly, a switch's forward pass returns the residuals of every branch
    (the taken one's, zeros for the others), all live until the backward pass: their sizes
    add up. Here the forward pass keeps only `args` (and the module's variables), and the
    backward pass is one switch whose branch i re-runs `branches[i]` and its VJP, so only
    the taken branch's activations exist, and only there. The recomputation is tied to the
    incoming cotangent as in `remat_call`. Values and gradients equal the plain switch's.

    Args:
      module: the calling module (bound); each branch is `f(module, *args)`.
      index_fn: `index_fn(*args)` -> int32 scalar, the branch to run (clamped as in `lax.switch`).
      branches: the branch functions.
      args: their array (pytree) arguments.
    """
    definition = module.clone(parent=None)  # unbound copy to re-run in the backward pass

    def call(mdl, *xs):
        return nn.switch(index_fn(*xs), branches, mdl, *xs)

    def forward(mdl, *xs):
        return call(mdl, *xs), (mdl.variables, xs)

    def backward(residuals, g):
        variables, xs = residuals
        params = variables.get("params", {})

        def branch_vjp(branch):
            def run(p, xs_):
                def apply(p_, *xs__):
                    return definition.apply({**variables, "params": p_}, *xs__, method=branch)

                return jax.vjp(apply, p, *xs_)[1](g)

            return run

        xs = _after(xs, g)
        params_t, *xs_t = jax.lax.switch(index_fn(*xs), [branch_vjp(b) for b in branches], params, xs)
        return ({"params": params_t}, *xs_t)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, *args)


def maybe_remat_call(module: nn.Module, *args, remat: bool):
    """`remat_call(module, *args)` if `remat` (and not initialising), else `module(*args)`."""
    if remat and not module.parent.is_initializing():
        return remat_call(module, *args)
    return module(*args)


_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_(fan_out)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride in the 3x3 conv unless stride_in_1x1). [N,H,W,Cin] -> [N,H/s,W/s,4*width]."""

    width: int
    stride: int = 1
    downsample: bool = False
    stride_in_1x1: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering
    zero_init_residual: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        bn = lambda name: FrozenBatchNorm(self.bn_eps, self.dtype, name=name)  # noqa: E731
        conv_ = functools.partial(conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels)
        out = conv_(self.width, 1, s1, name="conv1", kernel_init=_he_init)(x)
        out = nn.relu(bn("bn1")(out))
        out = conv_(self.width, 3, s3, name="conv2", kernel_init=_he_init)(out)
        out = nn.relu(bn("bn2")(out))
        last_init = nn.initializers.zeros if self.zero_init_residual else _he_init
        out = conv_(self.width * 4, 1, name="conv3", kernel_init=last_init)(out)
        out = bn("bn3")(out)
        if self.downsample:
            x = conv_(self.width * 4, 1, self.stride, name="downsample_0", kernel_init=_he_init)(x)
            x = bn("downsample_1")(x)
        return nn.relu(out + x)


class BasicBlock(nn.Module):
    """ResNet-18/34 block. [N,H,W,Cin] -> [N,H/s,W/s,width]."""

    width: int
    stride: int = 1
    downsample: bool = False
    stride_in_1x1: bool = False  # unused: kept so both block kinds share a signature
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering
    zero_init_residual: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x):
        bn = lambda name: FrozenBatchNorm(self.bn_eps, self.dtype, name=name)  # noqa: E731
        conv_ = functools.partial(conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels)
        out = conv_(self.width, 3, self.stride, name="conv1", kernel_init=_he_init)(x)
        out = nn.relu(bn("bn1")(out))
        last_init = nn.initializers.zeros if self.zero_init_residual else _he_init
        out = conv_(self.width, 3, name="conv2", kernel_init=last_init)(out)
        out = bn("bn2")(out)
        if self.downsample:
            x = conv_(self.width, 1, self.stride, name="downsample_0", kernel_init=_he_init)(x)
            x = bn("downsample_1")(x)
        return nn.relu(out + x)


def block_class(depth: int):
    if depth not in RESNET_SPECS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
    return Bottleneck if RESNET_SPECS[depth][0] == "bottleneck" else BasicBlock


def stage_channels(depth: int, width: int, stage: int) -> int:
    """Output channels of stage `stage` (1..4): width * 2**(stage-1) * expansion."""
    return width * 2 ** (stage - 1) * block_class(depth).expansion


class ResNetStage(nn.Module):
    """One stage (`layer1`..`layer4`): `num_blocks` blocks, the first with stride and downsample.

    `remat`: each block is a `remat_call` (keeps its input, recomputes the rest in the
    backward pass).
    """

    depth: int
    width: int
    num_blocks: int
    stride: int
    stride_in_1x1: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering
    zero_init_residual: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = block_class(self.depth)
        in_ch = x.shape[-1]
        for i in range(self.num_blocks):
            first = i == 0
            blk = block(
                self.width,
                stride=self.stride if first else 1,
                downsample=first and (self.stride != 1 or in_ch != self.width * block.expansion),
                stride_in_1x1=self.stride_in_1x1,
                bn_eps=self.bn_eps,
                dtype=self.dtype,
                cpu_kernels=self.cpu_kernels,
                zero_init_residual=self.zero_init_residual,
                name=str(i),
            )
            x = maybe_remat_call(blk, x, remat=self.remat)
        return x


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of stages 1..`num_stages`.

    Input: [N, H, W, 3] normalised images. Output: dict {"layer1": [N, H/4, W/4, C1], ...,
    f"layer{num_stages}": ...}; stage s has stride 2**(s+1) and `stage_channels(depth,
    width, s)` channels (ResNet-50: 256, 512, 1024, 2048).

    `freeze_at` follows Detectron2: 0 trains everything, 1 freezes the stem, 2 the stem
    and `layer1` (the maskrcnn-benchmark / torchvision default), k the stem and stages
    1..k-1. Frozen parts get no gradient here (`stop_gradient`); the optimiser also
    masks them (`frozen_param_prefixes`) so weight decay leaves them unchanged.

    `zero_init_residual` initialises the last conv of every residual branch to zero, so
    each block starts as the identity: with frozen (identity) batch norm this keeps a
    network trained from scratch stable (the Fixup / "zero-init residual" idea).

    `remat` rematerialises every residual block of the trained stages (see
    `ResNetStage`); the stem and frozen stages have no backward pass to recompute for.
    """

    depth: int = 50
    width: int = 64
    num_stages: int = 3
    stride_in_1x1: bool = False
    freeze_at: int = 2
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering
    zero_init_residual: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x) -> dict[str, jax.Array]:
        block_class(self.depth)  # validates the depth
        blocks = RESNET_SPECS[self.depth][1]
        x = x.astype(self.dtype)
        conv_ = functools.partial(conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels)
        x = conv_(self.width, 7, 2, name="conv1", kernel_init=_he_init)(x)
        x = nn.relu(FrozenBatchNorm(self.bn_eps, self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = {}
        for s in range(1, self.num_stages + 1):
            x = ResNetStage(
                self.depth,
                self.width * 2 ** (s - 1),
                blocks[s - 1],
                stride=1 if s == 1 else 2,
                stride_in_1x1=self.stride_in_1x1,
                bn_eps=self.bn_eps,
                dtype=self.dtype,
                cpu_kernels=self.cpu_kernels,
                zero_init_residual=self.zero_init_residual,
                remat=self.remat and self.freeze_at <= s,  # a frozen stage has no backward pass
                name=f"layer{s}",
            )(x)
            if self.freeze_at >= s + 1:
                x = jax.lax.stop_gradient(x)
            outputs[f"layer{s}"] = x
        return outputs


def frozen_param_prefixes(freeze_at: int) -> tuple[str, ...]:
    """Names of the trunk's top-level submodules that `freeze_at` freezes ("conv1", "layer1", ...)."""
    prefixes = []
    if freeze_at >= 1:
        prefixes.append("conv1")
    prefixes += [f"layer{s}" for s in range(1, freeze_at)]
    return tuple(prefixes)
