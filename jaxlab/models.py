"""Models: the contract any Flax module meets, and the MLP and conv-net families built on it.

Any `flax.linen.Module` is a jaxlab model (a Flax NNX module too, through
`flax.nnx.bridge.to_linen`) whose `__call__(self, x, train: bool = False)` maps a batch of
images (N, H, W, C), float32 in [0, 1], to logits (N, classes), with Flax's conventions:
BatchNorm statistics in the `batch_stats` collection, dropout drawing from the `dropout` RNG
(given at initialization too, for NNX modules that keep their RNG streams). Nothing in jaxlab
asks a model its class; what it needs to know it asks the model, or reads from what the model
computes:

  fit(model, image_shape, num_classes)   its own `fit_to(image_shape, num_classes)` if it has
                                         one; else a clone with the data set's `num_classes`
                                         where it has that field; else the model as it is
  at_precision(model, "bf16")            its own `at_precision(precision, backend)`; else a
                                         clone with `dtype=bfloat16` where it has a `dtype`
                                         field (an NNX module: a `dtype` keyword of the bridge)
  regularizer(model)                     its own `regularization(params)`, added to the train
                                         loss (as Keras's kernel regularizers are), if it has one
  convolves(model, shape), flops(...)    read from its jaxpr: whether it convolves (which loop
                                         and CPU kernels suit it), its Dense/Conv FLOPs
  module_outputs(model, variables, x)    every submodule's output, by path ("block/conv")

The plan families, `MLP` and `ConvNet`, are models of this kind with extras: they are declared
with small frozen specs (`Dense`, `Parallel`, `Conv`, `MaxPool`, `ConvBlock`), turned into a
flat *plan*, a tuple of `Op`s, one per Keras layer, with Keras's own layer names (`dense`,
`dense_1`, `batch_normalization`, ...), run by one layer engine (`walk` with `FLAX_LAYERS`).
The plan is their single source of truth for the forward pass, the summary, the L2 term and
layer capture, and what gives them Keras parity (`jaxlab.keras`) and a PyTorch twin (the
benchmark), which other models do not have.

Keras semantics reproduced by the plan families: Glorot-uniform kernels and zero biases; `valid`
padding unless `same`; floor max pooling; BatchNormalization with momentum 0.99 and epsilon
1e-3; inverted dropout that is active only in training; channels-last flatten. The output
layer returns logits; the softmax lives in the loss (and in `predict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax.core import meta

from jaxlab.caches import cached
from jaxlab.config import PRECISIONS, check_choice
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


# What each of `jaxlab.config.PRECISIONS` computes in; parameters, BatchNorm statistics, the
# loss and the optimizer stay float32 in both:
#   float32  everything in float32 (any model: as it is declared);
#   bf16     a model of the plan families: on a GPU, bfloat16 layers (Flax's `dtype`: every
#            dot, convolution and elementwise op reads and writes bfloat16; the path measured
#            on an H100); elsewhere (XLA:CPU), every Dense dot reads bfloat16 operands and
#            accumulates and writes float32, forward and backward (`mixed_matmul`), and
#            convolutions and the rest stay float32: no kernel library of XLA:CPU runs a
#            bfloat16 convolution, so bfloat16 there would only add conversions. Any other
#            model: its `dtype` set to bfloat16 (its own `at_precision`, where it has one).


def at_precision(model: nn.Module, precision: str, backend: str | None = None) -> nn.Module:
  """`model` computing in `precision` on `backend` (default: JAX's), as said above: the
  model's own `at_precision(precision, backend)`, else its `dtype` field (a clear error where it
  has none)."""
  check_choice("precision", precision, PRECISIONS)
  own = _own(model, "at_precision")
  if own is not None:
    return own(precision, backend)
  if precision == "float32":
    return model
  if _bridged(model) and "dtype" in model.kwargs:
    return model.clone(kwargs=type(model.kwargs)({**model.kwargs, "dtype": jnp.bfloat16}))
  if "dtype" not in _fields(model):
    raise BadValue(f"--precision=bf16 sets a model's dtype, and {type(model).__name__} has no "
                   "dtype field (give it one, `dtype: Any = jnp.float32`, passed to its layers, "
                   "or an at_precision(precision, backend) method)")
  return model.clone(dtype=jnp.bfloat16)


def _dtype(model: nn.Module) -> Any:
  if _bridged(model):
    return model.kwargs.get("dtype")
  return getattr(model, "dtype", None) if "dtype" in _fields(model) else None


def op_precisions(model: nn.Module) -> dict[str, str]:
  """The precision ("float32" or "bf16") the dots and the convolutions of `model` run in."""
  bf16 = _dtype(model) == jnp.bfloat16
  return {"dense": "bf16" if bf16 or getattr(model, "mixed_dots", False) else "float32",
          "conv2d": "bf16" if bf16 else "float32"}


def describe_precision(model: nn.Module) -> str:
  """How `model` computes, in words (for config.json's environment and the scripts)."""
  if getattr(model, "mixed_dots", False):
    return ("bf16: dots read bfloat16 and accumulate and write float32 (forward and backward); "
            "convolutions and the rest float32")
  return "bf16: bfloat16 layers" if _dtype(model) == jnp.bfloat16 else "float32"


BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "linear": lambda x: x,
    None: lambda x: x,
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
    """The Keras class of the layer: its Flax layer's `type_name`."""
    return type_name(FLAX_LAYERS[self.kind].module)

  def describe(self) -> dict[str, Any]:
    """The op as a JSON-ready dict: the settings its kind uses (`Layer.settings_used`; an L2
    of 0 left out)."""
    out: dict[str, Any] = {"name": self.name, "type": self.keras_type}
    for key, field in FLAX_LAYERS[self.kind].settings_used:
      value = getattr(self, field)
      if not (field == "l2" and not value):
        out[key] = value
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


# ----------------------------------------------------------------------------- any model


def _fields(model: nn.Module) -> set[str]:
  return {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()


def _own(model: nn.Module, method: str) -> Callable | None:
  """The model's own method of the contract (`fit_to`, ...), or None: looked up on its class, so
  that a module's attribute lookup (the NNX bridge forwards unknown names) answers nothing else."""
  return getattr(model, method) if callable(getattr(type(model), method, None)) else None


def _bridged(model: nn.Module) -> bool:
  """Whether `model` is an NNX module seen through `flax.nnx.bridge.to_linen`."""
  from flax.nnx import bridge
  return isinstance(model, bridge.ToLinen)


def fit(model: nn.Module, image_shape: Sequence[int], num_classes: int) -> nn.Module:
  """`model` fitted to a data set's images and classes: its own `fit_to(image_shape,
  num_classes)`, else a clone with `num_classes` where it has that field (the NNX bridge: that
  keyword), else the model as it is (`check_outputs` says whether it fits)."""
  own = _own(model, "fit_to")
  if own is not None:
    return own(tuple(image_shape), num_classes)
  if _bridged(model) and "num_classes" in model.kwargs:
    return model.clone(kwargs=type(model.kwargs)({**model.kwargs, "num_classes": num_classes}))
  if "num_classes" in _fields(model):
    return model.clone(num_classes=num_classes)
  return model


def regularizer(model: nn.Module) -> Callable[[Any], jax.Array] | None:
  """The model's own `regularization(params)`, the term its train loss adds, or None."""
  return _own(model, "regularization")


def input_shape(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of one example as the model's first layer takes it: its own `input_shape()`
  (a plan MLP takes the pixels flattened), else the image's."""
  own = _own(model, "input_shape")
  return tuple(own()) if own is not None else tuple(image_shape)


def example(image_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
  """One example's abstract input: (1, H, W, C) float32."""
  return jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)


def init_rngs(init_key: Any, dropout_key: Any) -> dict[str, Any]:
  """The RNG streams `model.init` gets: parameters, and dropout (NNX modules draw their dropout
  streams when they are made)."""
  return {"params": init_key, "dropout": dropout_key}


_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def abstract_variables(model: nn.Module, image_shape: Sequence[int]) -> dict[str, Any]:
  """The model's variables as shapes only (`jax.eval_shape`): no memory, no compute. Traced
  once per (model, shape) in a process; each call gets containers of its own."""
  return jax.tree_util.tree_map(lambda leaf: leaf,
                                _abstract_variables(model, tuple(image_shape)))


@cached
def _abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, Any]:
  return jax.eval_shape(lambda p, d, x: model.init(init_rngs(p, d), x), _ABSTRACT_KEY,
                        _ABSTRACT_KEY, example(image_shape))


def check_outputs(model: nn.Module, image_shape: Sequence[int], num_classes: int,
                  name: str = "") -> None:
  """Raises BadValue unless the model takes `train` and maps a batch of these images to logits
  (N, num_classes) (traced with shapes only)."""
  what = f"the model of {name!r} ({type(model).__name__})" if name else type(model).__name__
  call = model.nnx_class.__call__ if _bridged(model) else type(model).__call__
  signature = inspect.signature(call)
  if not any(p.name == "train" or p.kind is p.VAR_KEYWORD
             for p in signature.parameters.values()):
    raise BadValue(f"{what} has __call__{signature}, without a `train` argument: jaxlab calls "
                   "model(x, train=...) (True in its train steps, for dropout and batch "
                   "statistics); give it `train: bool = False`")
  shape = _output_shape(model, tuple(image_shape))
  if shape != (1, num_classes):
    raise BadValue(f"{what} maps images {tuple(image_shape)} to {shape}, "
                   f"not logits (N, {num_classes}); give it a num_classes field or a "
                   "fit_to(image_shape, num_classes) method")


@cached
def _output_shape(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                       abstract_variables(model, image_shape), example(image_shape))
  return getattr(out, "shape", None) or type(out).__name__


def _eqns(jaxpr: Any):
  """Every equation of a jaxpr and of the jaxprs inside its equations (calls, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr holds its Jaxpr.
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _forward_jaxpr(model: nn.Module, image_shape: Sequence[int]) -> Any:
  variables = abstract_variables(model, image_shape)
  return jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, example(image_shape)).jaxpr


def flops_by_kind(model: nn.Module, image_shape: Sequence[int]) -> dict[str, int]:
  """Multiply-add FLOPs (2 per MAC) of one example's forward pass, read from its jaxpr: the
  dots ("dense") and the convolutions ("conv2d")."""
  totals = {"dense": 0, "conv2d": 0}
  for eqn in _eqns(_forward_jaxpr(model, image_shape)):
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      totals["dense"] += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      totals["conv2d"] += 2 * math.prod(out) * math.prod(kernel) // out_features
  return totals


def convolves(model: nn.Module, image_shape: Sequence[int]) -> bool:
  """Whether the model computes a convolution (its jaxpr has one)."""
  return flops_by_kind(model, image_shape)["conv2d"] > 0


def type_name(module: Any) -> str:
  """A module's type as a summary shows it: its `keras_type` where it says one, else its
  class's name."""
  cls = module if isinstance(module, type) else type(module)
  return getattr(cls, "keras_type", None) or cls.__name__


def _bridged_modules(model: nn.Module, image_shape: Sequence[int]) -> list[nn.Module]:
  """The NNX modules seen through the bridge inside `model` (shapes only; traced once per
  (model, shape) in a process)."""
  return list(_bridged_traced(model, tuple(image_shape)))


@cached
def _bridged_traced(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[nn.Module, ...]:
  found: list[nn.Module] = []

  def note(mdl: nn.Module, method: str) -> bool:
    if _bridged(mdl) and method == "__call__":
      found.append(mdl)
    return False

  jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=note,
                                          mutable=["intermediates"]),
                 abstract_variables(model, image_shape), example(image_shape))
  return tuple(found)


def _nnx_modules(bridged: nn.Module) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(path inside the Linen model, NNX module) of every module of a bridged NNX module, made
  with shapes only."""
  from flax import nnx
  made = nnx.eval_shape(lambda: bridged.nnx_class(
      *bridged.args, **bridged.kwargs,
      **({} if bridged.skip_rng else {"rngs": nnx.Rngs(0, dropout=1)})))
  for path, module in nnx.iter_modules(made):
    yield tuple(map(str, bridged.path)) + tuple(map(str, path)), module


NNX_OUTPUT = "jaxlab_output"  # What an NNX module's output is sown as while `capturing`.


@contextlib.contextmanager
def capturing(model: nn.Module, image_shape: Sequence[int]) -> Iterator[None]:
  """Within the block, `module_outputs` sees inside the NNX modules of `model` seen through the
  bridge: each NNX module's class sows its output (`nnx.Intermediate`, NNX_OUTPUT), which the
  bridge hands to Linen's `intermediates`."""
  from flax import nnx
  classes = {type(m) for b in _bridged_modules(model, image_shape) for _, m in _nnx_modules(b)}
  patched = []
  for cls in classes:
    def sowing(self, *args, _call=cls.__call__, **kwargs):
      out = _call(self, *args, **kwargs)
      setattr(self, NNX_OUTPUT, nnx.Intermediate((out,)))  # What `sow` keeps, for the bridge.
      return out

    patched.append((cls, cls.__dict__.get("__call__")))
    cls.__call__ = sowing
  try:
    yield
  finally:
    for cls, own in reversed(patched):
      if own is None:
        del cls.__call__
      else:
        cls.__call__ = own


def _flatten_calls(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                   ) -> Iterator[tuple[str, Any]]:
  """(path, output of the module's last call) in the order the calls finished: a module's
  submodules before the module itself."""
  for key, value in tree.items():
    if key in ("__call__", NNX_OUTPUT):
      calls = meta.unbox(value)
      if prefix:  # The model itself is not one of its submodules.
        yield "/".join(prefix), calls[-1] if isinstance(calls, (tuple, list)) else calls
    elif isinstance(value, Mapping):
      yield from _flatten_calls(value, prefix + (str(key),))


def calls_of(model: nn.Module, variables: Mapping[str, Any], x: Any, train: bool = False,
             rngs: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`module_outputs` without `capturing` (for a caller that holds it, around a jit)."""
  state = model.apply(variables, x, train=train, rngs=rngs or {},
                      capture_intermediates=lambda mdl, method: method == "__call__",
                      mutable=["intermediates", "batch_stats"] if train else ["intermediates"])[1]
  return dict(_flatten_calls(state["intermediates"]))


def module_outputs(model: nn.Module, variables: Mapping[str, Any], x: Any, train: bool = False,
                   rngs: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Every submodule's output on batch `x` (its last call's), by path ("block/conv_0"), in the
  order the calls finished; inside an NNX module seen through the bridge, its NNX submodules'
  too. `train=True` runs BatchNorm on batch statistics and Dropout with `rngs` (the statistics
  updates are discarded)."""
  with capturing(model, jnp.shape(x)[1:]):
    return in_order(calls_of(model, variables, x, train, rngs), model, jnp.shape(x)[1:])


def in_order(outputs: Mapping[str, Any], model: nn.Module,
             image_shape: Sequence[int]) -> dict[str, Any]:
  """`outputs` by submodule path, in the order the calls finished (`module_types`): a compiled
  program's outputs come back with their paths sorted."""
  order = [path for path in module_types(model, image_shape) if path in outputs]
  return {path: outputs[path] for path in [*order, *sorted(set(outputs) - set(order))]}


def module_types(model: nn.Module, image_shape: Sequence[int]) -> dict[str, str]:
  """Each submodule's path -> `type_name`, as `module_outputs` names them, in the order their
  calls finished (shapes only: a trace, which keeps the order a compiled program's outputs
  lose; traced once per (model, shape) in a process)."""
  return dict(_module_types(model, tuple(image_shape)))


@cached
def _module_types(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, str]:
  types: dict[str, str] = {}

  def note(mdl: nn.Module, method: str) -> bool:
    if method == "__call__":
      if mdl.path:
        types.setdefault("/".join(map(str, mdl.path)), type_name(mdl))
      if _bridged(mdl):
        types.update({"/".join(path): type_name(m) for path, m in _nnx_modules(mdl) if path})
    return False

  jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=note,
                                          mutable=["intermediates"]),
                 abstract_variables(model, image_shape), example(image_shape))
  return types


def describe(model: nn.Module, image_shape: Sequence[int]) -> dict[str, Any]:
  """The architecture as JSON-ready data, for config.json and each checkpoint's identity: a plan
  family's plan (`describe_plan`); any other model, its declaration (its fields, with no
  memory addresses) and its variables' shapes by path."""
  own = _own(model, "describe_plan")
  if own is not None:
    return own()
  variables = abstract_variables(model, image_shape)
  shapes = {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  return {"family": type(model).__name__, "input_shape": list(image_shape),
          "declaration": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(model)),
          "variables": shapes}


def plan_of(model: nn.Module, purpose: str) -> tuple[Op, ...]:
  """The plan of a model of the plan families, for what only they have (`purpose`: Keras
  parity, the PyTorch peer); any other model is a BadValue saying so."""
  own = _own(model, "plan")
  if own is None:
    raise BadValue(f"{purpose} is for the plan families (jaxlab.models.MLP, ConvNet); this "
                   f"model is a {type(model).__name__}")
  return own()


# ----------------------------------------------------------------------------- engine


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


@dataclasses.dataclass(frozen=True)
class Layer:
  """A kind of op's Flax layer: its module class, and its settings for an op of `model` (its
  compute dtype, its dots) in training or not. The module is named after its op, so
  `capture_intermediates` names it too, and its class says its Keras type (`type_name`).
  `settings_used`: (name in config.json, Op field) of the op's settings this kind uses."""

  module: type
  settings: Callable[[Op, Any, bool], dict[str, Any]]
  settings_used: tuple[tuple[str, str], ...] = ()

  def __call__(self, op: Op, model: Any, train: bool) -> nn.Module:
    return self.module(**self.settings(op, model, train), name=op.name)


class KerasDense(nn.Dense):
  """nn.Dense followed by its activation: the output of a Keras Dense layer."""

  keras_type = "Dense"
  activation: str | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](super().__call__(x))


class KerasConv(nn.Conv):
  """nn.Conv followed by its activation: the output of a Keras Conv2D layer."""

  keras_type = "Conv2D"
  activation: str | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.activation](super().__call__(x))


class BatchNormalization(nn.BatchNorm):
  """nn.BatchNorm, under Keras's name."""


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


# Op kind -> its Flax layer: one row per kind of layer of the plan families. (Keras's and the
# benchmark's PyTorch tables have a row only for the kinds they need to build otherwise.)
_USED = lambda *names: tuple((n, n) for n in names)

FLAX_LAYERS: dict[str, Layer] = {
    "dense": Layer(KerasDense, lambda op, model, train: dict(
        features=op.features, activation=op.activation, dtype=model.dtype,
        dot_general=mixed_dot_general if model.mixed_dots else None, **_GLOROT),
                   _USED("features", "activation", "l2")),
    "conv2d": Layer(KerasConv, lambda op, model, train: dict(
        features=op.features, kernel_size=(op.kernel_size,) * 2, strides=(op.strides,) * 2,
        padding=op.padding.upper(), activation=op.activation, dtype=model.dtype, **_GLOROT),
                    _USED("features", "kernel_size", "strides", "padding", "activation", "l2")),
    "batch_normalization": Layer(BatchNormalization, lambda op, model, train: dict(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=model.dtype)),
    "dropout": Layer(nn.Dropout, lambda op, model, train: dict(rate=op.rate,
                                                               deterministic=not train),
                     _USED("rate")),
    "max_pooling2d": Layer(MaxPooling2D, lambda op, model, train: dict(
        pool_size=op.kernel_size, strides=op.strides),
                           (("pool_size", "kernel_size"), ("strides", "strides"))),
    "flatten": Layer(Flatten, lambda op, model, train: {}),
    "concatenate": Layer(Concatenate, lambda op, model, train: {}),
}


class PlanModel(nn.Module):
  """Runs a plan of ops (`walk`, with `FLAX_LAYERS`). Subclasses say how their specs become a
  plan (`plan`), the shape of one example as their first layer takes it (`input_shape`), and
  how they fit a data set (`fit_to`)."""

  def plan(self) -> tuple[Op, ...]:
    raise NotImplementedError

  def input_shape(self) -> tuple[int, ...]:
    """The shape of one example as the first layer takes it."""
    raise NotImplementedError

  def fit_to(self, image_shape: tuple[int, ...], num_classes: int) -> PlanModel:
    raise NotImplementedError

  dtype: Any = jnp.float32  # Compute dtype; parameters are always float32.
  mixed_dots: bool = False  # Dense dots on bfloat16 operands, written in float32 (at_precision).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0],) + self.input_shape()).astype(self.dtype)
    x = walk(self.plan(), x, lambda op, x: FLAX_LAYERS[op.kind](op, self, train)(x),
             lambda op, xs: FLAX_LAYERS[op.kind](op, self, train)(xs))
    return x.astype(jnp.float32)

  def at_precision(self, precision: str, backend: str | None = None) -> PlanModel:
    """float32; or bf16 as `at_precision` says: bfloat16 layers on a GPU, mixed dots elsewhere."""
    if precision == "float32":
      return self.clone(dtype=jnp.float32, mixed_dots=False)
    if (backend or jax.default_backend()) == "gpu":
      return self.clone(dtype=jnp.bfloat16, mixed_dots=False)
    return self.clone(dtype=jnp.float32, mixed_dots=True)

  def l2_coefficients(self) -> dict[str, float]:
    """Layer name -> c for every kernel with `kernel_regularizer=l2(c)`."""
    return {op.name: op.l2 for op in iter_ops(self.plan()) if op.l2}

  def regularization(self, params: Any) -> jax.Array:
    """The L2 term of its regularized kernels (`l2_penalty`), which the train loss adds."""
    return l2_penalty(params, self.l2_coefficients())

  def describe_plan(self) -> dict[str, Any]:
    """The architecture as JSON-ready data: family, input shape and the plan."""
    return {"family": type(self).__name__, "input_shape": list(self.input_shape()),
            "layers": [op.describe() for op in self.plan()]}


def l2_penalty(params: Any, coefficients: dict[str, float]) -> jax.Array:
  """sum over regularized layers of c * sum(kernel ** 2): Keras's `kernel_regularizer=l2(c)`."""
  total = jnp.zeros((), jnp.float32)
  for name, c in coefficients.items():
    total = total + c * jnp.sum(jnp.square(params[name]["kernel"].astype(jnp.float32)))
  return total


def iter_ops(ops: Sequence[Op]):
  """Every op of a plan in model order, the ops inside parallel paths before their merge."""
  for op in ops:
    for path in op.paths:
      yield from iter_ops(path)
    yield op


# ----------------------------------------------------------------------------- families


class MLP(PlanModel):
  """The Lab 02 family: Dense specs (or parallel paths of them) and a Dense output."""

  layers: tuple[Dense | Parallel, ...] = ()
  num_classes: int = 10
  num_inputs: int = 784

  def input_shape(self) -> tuple[int, ...]:
    return (self.num_inputs,)

  def fit_to(self, image_shape: tuple[int, ...], num_classes: int) -> MLP:
    """The data set's pixels as inputs, its classes as outputs."""
    return self.clone(num_inputs=math.prod(image_shape), num_classes=num_classes)

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

  def fit_to(self, image_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    """The data set's image shape and classes (VGG on Fashion-MNIST and on CIFAR-10 are one
    declaration)."""
    return self.clone(image_shape=tuple(image_shape), num_classes=num_classes)

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
