"""The train step of a grid point: build, shard, lower and compile.

``build_step`` traces a point's step from abstract shapes only (nothing is
allocated, so it serves planning for a target as well); ``compile_point``
compiles it for the local devices and returns a CompiledStep holding the
executable with XLA's cost and memory analysis and its optimized HLO, plus a
jitted initializer that creates the sharded parameters and optimizer state
directly on the devices (each process only its own shards) and the synthetic
token batches, so nothing large crosses the host and nothing is timed that is
not the step.
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

from jaxscale import attention as attn
from jaxscale import hlo_cost, targets
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
      init_state: ``() -> (params, opt_state)``, sharded, from the run's seed:
        created on the devices, or for states up to HOST_INIT_MAX_BYTES placed
        from one host copy per model size.
      make_batch: ``(step_index) -> tokens`` of shape (global_batch, seq_len + 1).
      compile_s: wall time of lower + compile.
      cost: XLA's cost analysis of the per-device program (dict).
      memory: XLA's CompiledMemoryStats of the per-device program, or None.
      hlo_text: optimized HLO of the per-device program.
      params: parameter count read from the abstract model.
      param_bytes: parameter bytes held by one device.
      opt_state_bytes: optimizer-state bytes held by one device.
      attention: the attention kernel that was compiled (attention.AttentionChoice).
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
    attention: attn.AttentionChoice | None = None


def abstract_model(point: Point, run: RunSpec, seed: int = 0):
    """(graphdef, abstract param dict, logical-name dict) without allocating anything.

    The layers' parameters are stacked, with a leading ``layers`` axis that no
    strategy shards, whichever layer form runs them.
    """
    return _abstract_model(point.model, run.dtype, point.remat, run.scan_layers, seed)


def _model(spec, dtype: str, remat: str, scan_layers: bool, seed: int) -> Transformer:
    return Transformer(spec, dtype=dtype, remat=remat, scan_layers=scan_layers, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=16)
def _abstract_model(spec, dtype: str, remat: str, scan_layers: bool, seed: int):
    model = nnx.eval_shape(lambda: _model(spec, dtype, remat, scan_layers, seed))
    graphdef, state = nnx.split(model)
    abstract = nnx.to_pure_dict(state)

    def names(v: nnx.Variable) -> tuple:
        logical = tuple(v.get_metadata()["logical"])
        return ("layers", *logical) if len(v.shape) == len(logical) + 1 else logical

    logical = nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return graphdef, abstract, logical


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def synthetic_tokens(batch: int, seq_len: int, vocab: int, seed: int, n_batches: int = 2) -> list[np.ndarray]:
    """Uniform random token batches of shape (batch, seq_len + 1), identical on every process."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32) for _ in range(n_batches)]


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array on a (possibly multi-process) sharding; each process fills its own shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def cost_dict(compiled) -> dict:
    """cost_analysis() as one dict (older jax returned a list with one dict per program); {} when unavailable."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some targets (deviceless GPU compiles) do not implement it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A point's train step, traced and sharded but not compiled; nothing allocated.

    Attributes:
      point: the grid point.
      mesh: the device mesh (local devices, or a target's devices for planning).
      jitted: the jitted step ``(params, opt_state, tokens) -> (params, opt_state, loss)``.
      abstract_args: ShapeDtypeStructs of its three arguments, for lowering.
      initializer: ``() -> (params, opt_state)``: each process creates only its
        own shards, on the devices, from the run's seed (_initializer).
      state_shardings: (parameter shardings, optimizer-state shardings).
      batch_sharding: the sharding of a token batch.
      params, param_bytes, opt_state_bytes: parameter count and the state bytes
        one device holds.
      attention: the attention kernel the step calls, and why.
    """

    point: Point
    mesh: Mesh
    jitted: Any
    abstract_args: tuple
    initializer: Callable[[], tuple[Any, Any]]
    state_shardings: tuple[Any, Any]
    batch_sharding: NamedSharding
    params: int
    param_bytes: int
    opt_state_bytes: int
    attention: attn.AttentionChoice


def _stacked_params(spec, seed: int) -> dict:
    """A size's float32 parameters from the seed, the layers stacked (traced inside jit).

    The same seed gives the same weights under every sharding, dtype and layer
    form: JAX's partitionable threefry makes random bits independent of the
    layout, and every form starts from these stacked arrays (layer_form).
    """
    return nnx.to_pure_dict(nnx.split(_model(spec, "float32", "none", True, seed))[1])


def layer_form(params: dict, scan_layers: bool) -> dict:
    """Stacked parameters in a layer form's structure: as they are (scanned), or one entry per layer."""
    if scan_layers:
        return params
    stacked = params["layers"]
    n = len(jax.tree.leaves(stacked)[0])
    out = {k: v for k, v in params.items() if k != "layers"}
    out["blocks"] = {i: jax.tree.map(lambda a: a[i], stacked) for i in range(n)}
    return out


def _init_state(spec, seed: int, scan_layers: bool = False):
    """Parameters (in the layer form's structure) and AdamW state from the seed (traced inside jit)."""
    params = layer_form(_stacked_params(spec, seed), scan_layers)
    return params, optimizer().init(params)


# Below this many bytes of float32 parameters and optimizer state, a size's state is
# computed once on the host and each point places its shards from that copy: one
# initializer compile per size instead of one per point (about 2 s each on a CPU).
# Above it, every point runs the sharded initializer on its devices, so no host ever
# holds a large model's whole state.
HOST_INIT_MAX_BYTES = 1 << 30


@functools.lru_cache(maxsize=1)
def _host_params(spec, seed: int) -> dict:
    """A size's stacked parameters as host numpy arrays (the same function as on devices)."""
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        params = jax.jit(lambda: _stacked_params(spec, seed))()
    return jax.tree.map(np.asarray, params)


def build_step(point: Point, run: RunSpec, devices=None, attention: attn.AttentionChoice | None = None
               ) -> StepProgram:
    """Build the model, optimizer and shardings of a point, from abstract shapes only.

    Args:
      point: the grid point (model size, strategy, mesh shape, global batch, remat).
      run: dtype, seed, attention and scan_layers settings.
      devices: devices to draw the mesh from (default: all, grouped by process);
        a target's devices (jax.experimental.topologies) work too.
      attention: the attention kernel to call (default: attention.choose for
        the run's setting on these devices).
    """
    mesh = shd.make_mesh(point.data_axis, point.model_axis, devices)
    if attention is None:
        attention = attn.choose(run.attention, list(mesh.devices.flat), run.dtype, point.model)
    attend = attn.make_attend(attention.impl, mesh, point.strategy)
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
    spec = point.model

    def train_step(params, opt_state, tokens):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p), tokens, constrain, attend)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    init = _initializer(point, run, mesh, param_sh, opt_sh)
    step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh),
                   out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    abstract_tokens = jax.ShapeDtypeStruct((point.global_batch, spec.seq_len + 1), jnp.int32)
    return StepProgram(
        point=point, mesh=mesh, jitted=step, abstract_args=(abstract_params, abstract_opt, abstract_tokens),
        initializer=init, state_shardings=(param_sh, opt_sh), batch_sharding=batch_sh,
        params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)),
        param_bytes=shd.sharded_bytes_per_device(abstract_params, param_sh),
        opt_state_bytes=shd.sharded_bytes_per_device(abstract_opt, opt_sh), attention=attention,
    )


def _initializer(point: Point, run: RunSpec, mesh: Mesh, param_sh, opt_sh) -> Callable[[], tuple[Any, Any]]:
    """``() -> (params, opt_state)`` created on the devices, each process only its own shards.

    The stacked parameters come from one jitted initializer; for the unrolled
    form a second program slices them into per-layer arrays (the stacked ones
    donated) and creates the optimizer state. Two small programs rather than
    one: in one, XLA fuses the layers' random draws and slices into kernels
    that take minutes to compile.
    """
    tx = optimizer()
    spec, seed = point.model, run.seed
    if run.scan_layers:
        return jax.jit(lambda: _init_state(spec, seed, True), out_shardings=(param_sh, opt_sh))
    _, _, stacked_logical = _abstract_model(spec, run.dtype, point.remat, True, seed)
    stacked = jax.jit(lambda: _stacked_params(spec, seed),
                      out_shardings=shd.tree_shardings(stacked_logical, mesh, point.strategy))

    def split(params):
        params = layer_form(params, False)
        return params, tx.init(params)

    split = jax.jit(split, out_shardings=(param_sh, opt_sh))
    return lambda: split(stacked())


def compile_program(program: StepProgram):
    """Lower and compile a StepProgram: (compiled, compile_s, cost dict, memory stats or None, HLO text).

    The cost dict is XLA's cost analysis with ``flops`` and ``bytes accessed``
    counting every trip of the scanned layers (hlo_cost.loop_corrected_cost); XLA's
    own figures, which count a loop body once, are kept as ``xla_flops_one_trip``
    and ``xla_bytes_accessed_one_trip``.
    """
    start = time.perf_counter()
    with targets.deviceless_cudnn(list(program.mesh.devices.flat)):
        lowered = program.jitted.lower(*program.abstract_args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    try:
        memory = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        memory = None
    text = compiled.as_text() or ""
    return compiled, compile_s, corrected_cost(cost_dict(compiled), text), memory, text


def compile_step(program: StepProgram, run: RunSpec):
    """compile_program, with XLA's attention in place of an auto-chosen kernel that fails to compile.

    Returns:
      (the StepProgram that compiled, compiled, compile_s, cost, memory, HLO
      text); the program's ``attention`` says which kernel it calls and why.
      A kernel asked for by name that fails raises, as any compile error does.
    """
    try:
        return (program, *compile_program(program))
    except Exception as exc:
        if not program.attention.may_fall_back:
            raise
        choice = attn.fallback(program.attention, exc)
    program = build_step(program.point, run, list(program.mesh.devices.flat), attention=choice)
    return (program, *compile_program(program))


def corrected_cost(cost: dict, hlo_text: str) -> dict:
    """XLA's cost dict with loop trips counted (see hlo_cost.py); XLA's own figures kept beside."""
    flops, bytes_, correction = hlo_cost.loop_corrected_cost(cost, hlo_text)
    out = dict(cost)
    if correction.loops or "flops" not in cost:
        out["xla_flops_one_trip"] = cost.get("flops")
        out["xla_bytes_accessed_one_trip"] = cost.get("bytes accessed")
    if flops is not None:
        out["flops"] = flops
    else:  # the HLO's count cannot be trusted: no figure rather than XLA's one-trip one
        out.pop("flops", None)
    if bytes_ is not None:
        out["bytes accessed"] = bytes_
    return out


def compile_point(point: Point, run: RunSpec, devices=None) -> CompiledStep:
    """Build and compile a point's step for the local devices.

    Args:
      point: the grid point (model size, strategy, mesh shape, global batch).
      run: dtype, seed, attention and scan_layers settings.
      devices: devices to draw the mesh from (default: all, grouped by process).

    Returns:
      The CompiledStep; its state and batches are created on the devices only
      when ``init_state`` and ``make_batch`` are called. Compilation errors
      propagate as raised by XLA.
    """
    program, compiled, compile_s, cost, memory, hlo = compile_step(build_step(point, run, devices), run)
    spec = point.model
    tokens = synthetic_tokens(point.global_batch, spec.seq_len, spec.vocab, run.seed)

    def batch_fn(step_index: int) -> jax.Array:
        return place(tokens[step_index % len(tokens)], program.batch_sharding)

    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(program.abstract_args[:2]))
    if state_bytes <= HOST_INIT_MAX_BYTES:
        shardings = program.state_shardings

        def init_state():
            host = layer_form(_host_params(spec, run.seed), run.scan_layers)
            params = jax.tree.map(place, host, shardings[0])
            return params, jax.jit(optimizer().init, out_shardings=shardings[1])(params)
    else:
        init_state = program.initializer

    return CompiledStep(
        point=point, mesh=program.mesh, compiled=compiled, init_state=init_state, make_batch=batch_fn,
        compile_s=compile_s, cost=cost, memory=memory, hlo_text=hlo, params=program.params,
        param_bytes=program.param_bytes, opt_state_bytes=program.opt_state_bytes, attention=program.attention,
    )
