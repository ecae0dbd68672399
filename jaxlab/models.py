"""The MLP and conv-net families: architectures as data, run by one layer engine.

A model is declared with small frozen specs (`Dense`, `Parallel`, `Conv`, `MaxPool`,
`ConvBlock`). Each family turns its specs into a flat *plan*: a tuple of `Op`s, one per
Keras layer, with Keras's own layer names (`dense`, `dense_1`, `batch_normalization`, ...).
The plan is the single source of truth for the forward pass, the summary, the L2 term
and layer capture, so they can never disagree about which layer is which.

Keras semantics reproduced here: Glorot-uniform kernels and zero biases; `valid` padding
unless `same`; floor max pooling; BatchNormalization with momentum 0.99 and epsilon 1e-3;
inverted dropout that is active only in training; channels-last flatten. The output layer
returns logits; the softmax lives in the loss (and in `predict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.errors import BadValue

# ----------------------------------------------------------------------------- precision


@jax.custom_vjp
def mixed_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., k) times kernel (k, n), on bfloat16 operands, accumulated and written in float32,
  forward and backward: the two dots of the gradient read bfloat16 too (JAX's own transpose
  would hand them float32 operands), and the gradients come back in the inputs' dtype. What a
  CPU's bfloat16 units (AVX512-BF16, AMX) run several times faster than float32 dots."""
  return _mixed_matmul_fwd(x, kernel)[0]


def _contract_last(a: jax.Array, b: jax.Array, b_axis: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b_axis,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x: jax.Array, kernel: jax.Array):
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  # The inputs' dtypes travel as empty arrays: what a residual may hold is arrays.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))
  return _contract_last(xb, kb, 0), (xb, kb, dtypes)


def _mixed_matmul_bwd(saved, g: jax.Array):
  xb, kb, (x_dtype, kernel_dtype) = saved
  x_dtype, kernel_dtype = x_dtype.dtype, kernel_dtype.dtype
  gb = g.astype(jnp.bfloat16)
  dx = _contract_last(gb, kb, 1)  # g (..., n) times kernel^T.
  k, n = kb.shape
  dk = _contract_last(xb.reshape(-1, k).T, gb.reshape(-1, n), 0)  # x^T (k, m) times g (m, n).
  return dx.astype(x_dtype), dk.astype(kernel_dtype)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def mixed_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`jax.lax.dot_general` for Flax's Dense (`dot_general=`), as `mixed_matmul`."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  assert tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and batch == (
      (), ()), dimension_numbers  # Dense's contraction: the last axis of x, the kernel's first.
  return mixed_matmul(lhs, rhs)


# What `TrainConfig.precision` computes in; parameters, BatchNorm statistics, the loss and the
# optimizer stay float32 in both:
#   float32  everything in float32;
#   bf16     on a GPU, bfloat16 layers (Flax's `dtype`: every dot, convolution and elementwise
#            op reads and writes bfloat16; the path measured on an H100); elsewhere (XLA:CPU),
#            every Dense dot reads bfloat16 operands and accumulates and writes float32, forward
#            and backward (`mixed_matmul`), and convolutions and the rest stay float32: no
#            kernel library of XLA:CPU runs a bfloat16 convolution, so bfloat16 there would
#            only add conversions.
PRECISIONS = ("float32", "bf16")


def at_precision(model: PlanModel, precision: str, backend: str | None = None) -> PlanModel:
  """`model` computing in `precision` on `backend` (default: JAX's), as PRECISIONS says."""
  if precision == "float32":
    return model.clone(dtype=jnp.float32, mixed_dots=False)
  if (backend or jax.default_backend()) == "gpu":
    return model.clone(dtype=jnp.bfloat16, mixed_dots=False)
  return model.clone(dtype=jnp.float32, mixed_dots=True)


def op_precisions(model: PlanModel) -> dict[str, str]:
  """The precision ("float32" or "bf16") the Dense and the Conv2D layers of `model` run in."""
  bf16 = model.dtype == jnp.bfloat16
  return {"dense": "bf16" if bf16 or model.mixed_dots else "float32",
          "conv2d": "bf16" if bf16 else "float32"}


def describe_precision(model: PlanModel) -> str:
  """How `model` computes, in words (for config.json's environment and the scripts)."""
  if model.mixed_dots:
    return ("bf16: dots read bfloat16 and accumulate and write float32 (forward and backward); "
            "convolutions and the rest float32")
  return "bf16: bfloat16 layers" if model.dtype == jnp.bfloat16 else "float32"


BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "linear": lambda x: x,
    None: lambda x: x,
}

# Keras's class name for each op kind, as `model.summary()` prints it.
KERAS_TYPES = {
    "dense": "Dense",
    "batch_normalization": "BatchNormalization",
    "dropout": "Dropout",
    "conv2d": "Conv2D",
    "max_pooling2d": "MaxPooling2D",
    "flatten": "Flatten",
    "concatenate": "Concatenate",
}


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Dense:
  """Dense(features, activation), then optional BatchNormalization and Dropout."""

  features: int
  activation: str | None = "relu"
  batch_norm: bool = True
  dropout: float = 0.0
  l2: float = 0.0


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Paths of Dense specs that all read the same input; their outputs are concatenated."""

  paths: tuple[tuple[Dense, ...], ...]


@dataclasses.dataclass(frozen=True)
class Conv:
  """Conv2D(features, kernel_size, strides, padding, activation)."""

  features: int
  kernel_size: int
  strides: int = 1
  padding: str = "valid"
  activation: str | None = "relu"
  l2: float = 0.0


@dataclasses.dataclass(frozen=True)
class MaxPool:
  """MaxPooling2D(pool_size, strides), padding `valid` (floor), as in Keras."""

  pool_size: int
  strides: int | None = None  # None: equal to pool_size, as in Keras.


@dataclasses.dataclass(frozen=True)
class ConvBlock:
  """Conv layers, then MaxPool, BatchNormalization and Dropout, each optional."""

  convs: tuple[Conv, ...]
  pool: MaxPool | None = None
  batch_norm: bool = False
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Op:
  """One Keras layer of a plan: its name, kind and settings."""

  name: str
  kind: str
  features: int = 0
  activation: str | None = None
  kernel_size: int = 0
  strides: int = 1
  padding: str = "valid"
  rate: float = 0.0
  l2: float = 0.0
  paths: tuple[tuple["Op", ...], ...] = ()

  @property
  def keras_type(self) -> str:
    return KERAS_TYPES[self.kind]

  def describe(self) -> dict[str, Any]:
    """The op as a JSON-ready dict, leaving out settings its kind does not use."""
    out: dict[str, Any] = {"name": self.name, "type": self.keras_type}
    fields = {
        "dense": ("features", "activation", "l2"),
        "conv2d": ("features", "kernel_size", "strides", "padding", "activation", "l2"),
        "max_pooling2d": ("kernel_size", "strides"),
        "dropout": ("rate",),
    }.get(self.kind, ())
    for field in fields:
      value = getattr(self, field)
      if field == "l2" and not value:
        continue
      out["pool_size" if self.kind == "max_pooling2d" and field == "kernel_size" else field] = value
    if self.paths:
      out["paths"] = [[op.describe() for op in path] for path in self.paths]
    return out


class _Namer:
  """Hands out Keras-style unique names: dense, dense_1, dense_2, ..."""

  def __init__(self):
    self._counts: dict[str, int] = {}

  def __call__(self, kind: str) -> str:
    n = self._counts.get(kind, 0)
    self._counts[kind] = n + 1
    return kind if n == 0 else f"{kind}_{n}"


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise BadValue(f"dropout rate must be in [0, 1), got {rate}")


def _dense_ops(spec: Dense, name: _Namer) -> list[Op]:
  if spec.features <= 0:
    raise BadValue(f"Dense features must be positive, got {spec.features}")
  if spec.activation not in ACTIVATIONS:
    raise BadValue(f"unknown activation {spec.activation!r}; known: {sorted(a for a in ACTIVATIONS if a)}")
  _check_rate(spec.dropout)
  ops = [Op(name("dense"), "dense", features=spec.features, activation=spec.activation, l2=spec.l2)]
  if spec.batch_norm:
    ops.append(Op(name("batch_normalization"), "batch_normalization"))
  if spec.dropout:
    ops.append(Op(name("dropout"), "dropout", rate=spec.dropout))
  return ops


def _output_op(num_classes: int, name: _Namer) -> Op:
  # Keras's output layer is Dense(num_classes, activation='softmax'); here it returns logits.
  return Op(name("dense"), "dense", features=num_classes, activation=None)


# ----------------------------------------------------------------------------- engine


def has_convolutions(model: nn.Module) -> bool:
  """Whether `model` holds a convolution (its plan has a conv block)."""
  return bool(getattr(model, "blocks", ()))


def walk(ops: Sequence[Op], x: Any, layer: Callable[[Op, Any], Any],
         merge: Callable[[Op, list[Any]], Any]) -> Any:
  """What a plan means, in any framework: each op in turn, `layer(op, x)`, applied to what the
  op before it gave; an op with paths (a concatenation) is `merge(op, outputs)` of its paths,
  each walked from the same input. The Flax modules here, the Keras model of `jaxlab.keras`
  and the PyTorch peer of the benchmark are this walk, each with its table of layers."""
  for op in ops:
    x = merge(op, [walk(path, x, layer, merge) for path in op.paths]) if op.paths else layer(op, x)
  return x


_GLOROT = {"kernel_init": nn.initializers.glorot_uniform(), "bias_init": nn.initializers.zeros}

# Op kind -> the Flax module of an op of `model` (its compute dtype, its dots), in training or
# not; each named after its op, so `capture_intermediates` names it too.
FLAX_LAYERS: dict[str, Callable[[Op, Any, bool], nn.Module]] = {
    "dense": lambda op, model, train: KerasDense(
        op.features, activation=op.activation, dtype=model.dtype, name=op.name,
        dot_general=mixed_dot_general if model.mixed_dots else None, **_GLOROT),
    "conv2d": lambda op, model, train: KerasConv(
        op.features, (op.kernel_size,) * 2, strides=(op.strides,) * 2,
        padding=op.padding.upper(), activation=op.activation, dtype=model.dtype, name=op.name,
        **_GLOROT),
    "batch_normalization": lambda op, model, train: nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=model.dtype, name=op.name),
    "dropout": lambda op, model, train: nn.Dropout(op.rate, deterministic=not train,
                                                   name=op.name),
    "max_pooling2d": lambda op, model, train: MaxPooling2D(op.kernel_size, op.strides,
                                                           name=op.name),
    "flatten": lambda op, model, train: Flatten(name=op.name),
}


class PlanModel(nn.Module):
  """Runs a plan of ops (`walk`, with `FLAX_LAYERS`). Subclasses say how their specs become a
  plan."""

  def plan(self) -> tuple[Op, ...]:
    raise NotImplementedError

  def input_shape(self) -> tuple[int, ...]:
    """The shape of one example as the first layer takes it."""
    raise NotImplementedError

  dtype: Any = jnp.float32  # Compute dtype; parameters are always float32.
  mixed_dots: bool = False  # Dense dots on bfloat16 operands, written in float32 (PRECISIONS).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0],) + self.input_shape()).astype(self.dtype)
    x = walk(self.plan(), x, lambda op, x: FLAX_LAYERS[op.kind](op, self, train)(x),
             lambda op, xs: Concatenate(name=op.name)(xs))
    return x.astype(jnp.float32)


class KerasDense(nn.Dense):
  """nn.Dense followed by its activation: the output of a Keras Dense layer."""

  activation: str | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](super().__call__(x))


class KerasConv(nn.Conv):
  """nn.Conv followed by its activation: the output of a Keras Conv2D layer."""

  activation: str | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](super().__call__(x))


class MaxPooling2D(nn.Module):
  """Max pooling with padding `valid`: output size floor((n - pool) / stride) + 1."""

  pool_size: int
  strides: int

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (self.pool_size,) * 2, strides=(self.strides,) * 2, padding="VALID")


class Flatten(nn.Module):
  """Row-major flatten over (H, W, C): Keras's channels-last order."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0], -1))


class Concatenate(nn.Module):
  """Concatenation along the feature axis."""

  def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(xs, axis=-1)


def iter_ops(ops: Sequence[Op]):
  """Every op of a plan in model order, the ops inside parallel paths before their merge."""
  for op in ops:
    for path in op.paths:
      yield from iter_ops(path)
    yield op


def l2_coefficients(model: PlanModel) -> dict[str, float]:
  """Layer name -> c for every kernel with `kernel_regularizer=l2(c)`."""
  return {op.name: op.l2 for op in iter_ops(model.plan()) if op.l2}


def describe(model: PlanModel) -> dict[str, Any]:
  """The architecture as JSON-ready data: family, input shape and the plan."""
  return {
      "family": type(model).__name__,
      "input_shape": list(model.input_shape()),
      "layers": [op.describe() for op in model.plan()],
  }


# ----------------------------------------------------------------------------- families


class MLP(PlanModel):
  """The Lab 02 family: Dense specs (or parallel paths of them) and a Dense output."""

  layers: tuple[Dense | Parallel, ...] = ()
  num_classes: int = 10
  num_inputs: int = 784

  def input_shape(self) -> tuple[int, ...]:
    return (self.num_inputs,)

  def plan(self) -> tuple[Op, ...]:
    name = _Namer()
    ops: list[Op] = []
    for spec in self.layers:
      if isinstance(spec, Parallel):
        paths = tuple(tuple(op for d in path for op in _dense_ops(d, name)) for path in spec.paths)
        ops.append(Op(name("concatenate"), "concatenate", paths=paths))
      else:
        ops.extend(_dense_ops(spec, name))
    ops.append(_output_op(self.num_classes, name))
    return tuple(ops)


class ConvNet(PlanModel):
  """The Lab 04 family: conv blocks, Flatten, a Dense head and a Dense output (NHWC)."""

  blocks: tuple[ConvBlock, ...] = ()
  head: tuple[Dense, ...] = ()
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (28, 28, 1)

  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.image_shape)

  def plan(self) -> tuple[Op, ...]:
    name = _Namer()
    ops: list[Op] = []
    for block in self.blocks:
      for conv in block.convs:
        if conv.padding not in ("valid", "same"):
          raise BadValue(f"Conv2D padding must be 'valid' or 'same', got {conv.padding!r}")
        ops.append(Op(name("conv2d"), "conv2d", features=conv.features, kernel_size=conv.kernel_size,
                      strides=conv.strides, padding=conv.padding, activation=conv.activation,
                      l2=conv.l2))
      if block.pool is not None:
        strides = block.pool.strides or block.pool.pool_size
        ops.append(Op(name("max_pooling2d"), "max_pooling2d", kernel_size=block.pool.pool_size,
                      strides=strides))
      if block.batch_norm:
        ops.append(Op(name("batch_normalization"), "batch_normalization"))
      if block.dropout:
        _check_rate(block.dropout)
        ops.append(Op(name("dropout"), "dropout", rate=block.dropout))
    ops.append(Op(name("flatten"), "flatten"))
    for spec in self.head:
      ops.extend(_dense_ops(spec, name))
    ops.append(_output_op(self.num_classes, name))
    return tuple(ops)
