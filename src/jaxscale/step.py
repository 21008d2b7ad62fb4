"""The train step of a grid point: build, shard, lower and compile.

``compile_point`` returns a CompiledStep holding the compiled executable with
XLA's cost and memory analysis and its optimized HLO, plus jitted functions
that create the sharded state and synthetic token batches directly on the
devices (so nothing large crosses the host and nothing is timed that is not
the step).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxscale import sharding as shd
from jaxscale.config import RunSpec
from jaxscale.grid import Point
from jaxscale.model import Transformer, next_token_loss

LEARNING_RATE = 3e-4
WEIGHT_DECAY = 0.1


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A compiled train step and what XLA says about it.

    Attributes:
      point: the grid point.
      mesh: the device mesh the step runs on.
      compiled: ``(params, opt_state, tokens) -> (params, opt_state, loss)``;
        params and opt_state are donated.
      init_state: ``() -> (params, opt_state)``, sharded, from the run's seed.
      make_batch: ``(step_index) -> tokens`` of shape (global_batch, seq_len + 1).
      compile_s: wall time of lower + compile.
      cost: XLA's cost analysis of the per-device program (dict).
      memory: XLA's CompiledMemoryStats of the per-device program, or None.
      hlo_text: optimized HLO of the per-device program.
      params: parameter count read from the abstract model.
      param_bytes: parameter bytes held by one device.
      opt_state_bytes: optimizer-state bytes held by one device.
    """

    point: Point
    mesh: Mesh
    compiled: Any
    init_state: Callable[[], tuple[Any, Any]]
    make_batch: Callable[[int], jax.Array]
    compile_s: float
    cost: dict
    memory: Any
    hlo_text: str
    params: int
    param_bytes: int
    opt_state_bytes: int


def abstract_model(point: Point, run: RunSpec, seed: int = 0):
    """(graphdef, abstract param dict, logical-name dict) without allocating anything."""
    return _abstract_model(point.model, run.dtype, run.attention, point.remat, seed)


@functools.lru_cache(maxsize=8)
def _abstract_model(spec, dtype: str, attention: str, remat: str, seed: int):
    model = nnx.eval_shape(lambda: Transformer(spec, dtype=dtype, attention=attention,
                                               remat=remat, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    abstract = nnx.to_pure_dict(state)
    logical = jax.tree.map(lambda v: tuple(v.get_metadata()["logical"]), state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    logical = nnx.to_pure_dict(logical)
    return graphdef, abstract, logical


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


@functools.lru_cache(maxsize=2)
def host_init(spec, run: RunSpec) -> tuple[dict, Any]:
    """Initial float32 parameters and optimizer state of a model size, as host numpy arrays.

    Computed once per size on the CPU backend and shared by every point of that
    size, so all strategies and device counts start from identical weights and
    no point pays for compiling a sharded initializer.
    """
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        model = Transformer(spec, dtype=run.dtype, attention=run.attention, rngs=nnx.Rngs(run.seed))
        params = nnx.to_pure_dict(nnx.split(model)[1])
        opt_state = optimizer().init(params)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, opt_state)


def synthetic_tokens(batch: int, seq_len: int, vocab: int, seed: int, n_batches: int = 2) -> list[np.ndarray]:
    """Uniform random token batches of shape (batch, seq_len + 1), identical on every process."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32) for _ in range(n_batches)]


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array on a (possibly multi-process) sharding; each process fills its own shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def cost_dict(compiled) -> dict:
    """cost_analysis() as one dict (older jax returned a list with one dict per program)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_point(point: Point, run: RunSpec, devices=None) -> CompiledStep:
    """Build the model, optimizer and shardings of a point and compile its step.

    Args:
      point: the grid point (model size, strategy, mesh shape, global batch).
      run: dtype, seed, remat and attention settings.
      devices: devices to draw the mesh from (default: all, grouped by process).

    Returns:
      The CompiledStep. Compilation errors propagate as raised by XLA.
    """
    mesh = shd.make_mesh(point.data_axis, point.model_axis, devices)
    strategy = point.strategy
    graphdef, abstract_params, logical = abstract_model(point, run, run.seed)
    param_sh = shd.tree_shardings(logical, mesh, strategy)
    tx = optimizer()
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    batch_sh = NamedSharding(mesh, shd.logical_to_spec(("batch", None), strategy))
    constrain = shd.make_constrain(mesh, strategy)
    spec, seq = point.model, point.model.seq_len

    host_params, host_opt = host_init(spec, run)

    def init_state():
        params = jax.tree.map(place, host_params, param_sh)
        return params, jax.tree.map(place, host_opt, opt_sh)
    tokens = synthetic_tokens(point.global_batch, seq, spec.vocab, run.seed)

    def batch_fn(step_index: int) -> jax.Array:
        return place(tokens[step_index % len(tokens)], batch_sh)

    def train_step(params, opt_state, tokens):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p), tokens, constrain)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh),
                   out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    abstract_tokens = jax.ShapeDtypeStruct((point.global_batch, seq + 1), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(abstract_params, abstract_opt, abstract_tokens).compile()
    compile_s = time.perf_counter() - start
    try:
        memory = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        memory = None
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    return CompiledStep(
        point=point, mesh=mesh, compiled=compiled, init_state=init_state, make_batch=batch_fn,
        compile_s=compile_s, cost=cost_dict(compiled), memory=memory, hlo_text=compiled.as_text() or "",
        params=params,
        param_bytes=shd.sharded_bytes_per_device(abstract_params, param_sh),
        opt_state_bytes=shd.sharded_bytes_per_device(abstract_opt, opt_sh),
    )
