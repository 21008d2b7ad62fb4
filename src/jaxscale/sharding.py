"""Meshes over device subsets and the PartitionSpec rules of each strategy.

Parameters and activations carry logical axis names; a strategy is a table
from logical name to mesh axis. The mesh is always 2-D, (data, model):

    dp       (n, 1)   batch → data; every parameter replicated
    fsdp     (n, 1)   batch → data; parameters and optimizer state sharded
                      over data along their embed axis (ZeRO-3)
    tp       (1, n)   heads, mlp and vocab → model (Megatron-style); batch replicated
    fsdp_tp  (n/m, m) both: embed → data, heads/mlp/vocab → model

XLA's SPMD partitioner inserts every collective; nothing here communicates.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")

RULES: dict[str, dict[str, str]] = {
    "dp": {"batch": "data"},
    "fsdp": {"batch": "data", "embed": "data"},
    "tp": {"batch": "data", "heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"batch": "data", "embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}


def pick_devices(n: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """n devices, the same number from every process, grouped by process.

    Grouping keeps a mesh's trailing (model) axis inside one host where it fits,
    so tensor parallelism uses the fast intra-host links.
    """
    devices = list(jax.devices() if devices is None else devices)
    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    n_proc = len(by_process)
    if n % n_proc:
        raise ValueError(f"{n} devices cannot be split evenly over {n_proc} processes")
    per = n // n_proc
    picked = []
    for proc in sorted(by_process):
        local = sorted(by_process[proc], key=lambda d: d.id)
        if per > len(local):
            raise ValueError(f"process {proc} has {len(local)} devices, {per} needed")
        picked.extend(local[:per])
    return picked


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    picked = pick_devices(data * model, devices)
    return Mesh(np.array(picked).reshape(data, model), AXES)


def logical_to_spec(names: Sequence[str | None], strategy: str) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names."""
    rules = RULES[strategy]
    used: set[str] = set()
    out = []
    for name in names:
        axis = rules.get(name) if name else None
        if axis in used:  # a mesh axis may shard one array axis only
            axis = None
        if axis:
            used.add(axis)
        out.append(axis)
    return PartitionSpec(*out)


def tree_shardings(logical_tree: Any, mesh: Mesh, strategy: str) -> Any:
    """Map a tree of logical-name tuples to NamedShardings."""
    return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, strategy)), logical_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def make_constrain(mesh: Mesh, strategy: str):
    """The activation-constraint function the model calls with logical names."""

    def constrain(x: jax.Array, names: tuple) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, strategy)))

    return constrain


def sharded_bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes of a tree's shards held by one device (the largest shard of each leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
    return total
