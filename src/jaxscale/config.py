"""Profiles: a sweep definition in TOML → frozen, validated specs.

A profile has four tables, mirroring the dataclasses below:

    [run]    name, steps, warmup, dtype, seed, remat, attention, causal_flops,
             max_memory_fraction, scan_layers, isolation, xla_flags
             (remat and xla_flags may be lists: each is a grid axis)
    [model]  d_model, n_layers, n_heads, d_ff or d_ff_ratio, seq_len, vocab
             (each a scalar or a list: the sizes are their product), or
             [[model.sizes]] tables with a name each (keys in [model] are defaults)
    [batch]  global_batch (strong scaling) or per_device_batch (weak scaling),
             each a number or a list (a grid axis)
    [mesh]   devices, strategies, model_axis, topology (for `jaxscale plan`)

Everything is checked here, where it is built, and every problem is a
ProfileError whose text names the file, the key, the value and what would be
accepted; nothing downstream re-checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import re
import tomllib
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# Activation checkpointing of each layer: nothing saved for the backward pass is
# recomputed ("none"), everything is ("full"), or only the matmul outputs are kept
# and the cheap elementwise work is recomputed ("save_dots").
REMAT_POLICIES = ("none", "full", "save_dots")
ISOLATION_MODES = ("auto", "process", "none")

# The XLA flags jaxscale itself put into XLA_FLAGS (the CPU's virtual device count), so that records can tell
# them from the user's.
ADDED_XLA_FLAGS_ENV = "JAXSCALE_ADDED_XLA_FLAGS"

MODEL_KEYS = ("d_model", "n_layers", "n_heads", "d_ff", "d_ff_ratio", "seq_len", "vocab")

# Defaults: a profile only says what differs from these.
DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "name": "",
        "steps": 10,
        "warmup": 2,
        "dtype": "float32",
        "seed": 0,
        "remat": "none",
        "attention": "auto",
        "causal_flops": True,
        "max_memory_fraction": 0.95,
        "scan_layers": False,
        "isolation": "auto",
        "xla_flags": [""],
    },
    "model": {
        "d_model": 256,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff_ratio": 4,
        "seq_len": 128,
        "vocab": 1024,
    },
    "batch": {},
    "mesh": {
        "devices": [1],
        "strategies": ["dp"],
        "model_axis": 2,
        "topology": "",
    },
}
_ALLOWED = {
    "run": set(DEFAULTS["run"]),
    "model": set(MODEL_KEYS) | {"sizes"},
    "batch": {"global_batch", "per_device_batch"},
    "mesh": set(DEFAULTS["mesh"]),
}
_SIZE_KEYS = set(MODEL_KEYS) | {"name"}


class BadInput(ValueError):
    """Input the user can fix (a profile, a path, a flag), said in one line: the CLI prints it and exits 2."""


class ProfileError(BadInput):
    """A profile problem, phrased for the person who wrote the profile."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The [run] table. ``remat`` and ``xla_flags`` are grid axes (one value per point).

    Attributes:
      isolation: ``process`` runs every point in a worker process of its own,
        ``none`` in the sweep's process, ``auto`` chooses per backend.
      xla_flags: flag sets, each a string of space-separated ``--xla_...`` flags
        ("" for XLA's defaults).
      scan_layers: compile the layers as one scanned layer (stacked parameters)
        rather than unrolled.
    """

    name: str
    steps: int
    warmup: int
    dtype: str
    seed: int
    remat: tuple[str, ...]
    attention: str
    causal_flops: bool
    max_memory_fraction: float
    scan_layers: bool = False
    isolation: str = "auto"
    xla_flags: tuple[str, ...] = ("",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model size."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int
    vocab: int
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def size_name(self) -> str:
        return self.name or f"d{self.d_model}-l{self.n_layers}"


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Exactly one of global_batch (strong scaling) or per_device_batch (weak).

    Each is a tuple of values: several values make the batch a grid axis.
    """

    global_batch: tuple[int, ...] | None = None
    per_device_batch: tuple[int, ...] | None = None

    @property
    def mode(self) -> str:
        return "strong" if self.global_batch is not None else "weak"

    def globals_for(self, n_devices: int) -> tuple[int, ...]:
        """Global batches at a device count: fixed, or per-device batch × devices."""
        if self.global_batch is not None:
            return self.global_batch
        return tuple(b * n_devices for b in self.per_device_batch)

    def global_for(self, n_devices: int) -> int:
        """The first (or only) global batch at a device count."""
        return self.globals_for(n_devices)[0]


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The [mesh] table; ``topology`` names the target `jaxscale plan` compiles for ("" for none)."""

    devices: tuple[int, ...]
    strategies: tuple[str, ...]
    model_axis: int
    topology: str = ""


@dataclasses.dataclass(frozen=True)
class Profile:
    run: RunSpec
    models: tuple[ModelSpec, ...]
    batch: BatchSpec
    mesh: MeshSpec
    source: str
    raw: dict = dataclasses.field(repr=False, compare=False)

    def to_toml(self) -> str:
        """The resolved profile (defaults filled in) as TOML, for the report folder."""
        return dump_toml(self.raw)


# ---------------------------------------------------------------- loading


def profiles_dir() -> Path:
    """Folder of the shipped profiles: inside the installed package, else the source tree."""
    packaged = resources.files("jaxscale") / "profiles"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "profiles"


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(profiles_dir().glob("*.toml"))}


def profile_summary(path: Path) -> tuple[str, str]:
    """(``run`` or ``plan``, the first sentence of the file's leading comment) of a profile file.

    A profile with a [mesh] topology is for `jaxscale plan`.
    """
    text = Path(path).read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    words = " ".join(comment)
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.\s+(?=\S)", words)  # a sentence's end, not "e.g. "
    sentence = words if end is None else words[:end.start() + 1]
    try:
        topology = tomllib.loads(text).get("mesh", {}).get("topology")
    except tomllib.TOMLDecodeError:
        topology = None
    return ("plan" if topology else "run"), sentence or "(no description)"


def resolve_profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise ProfileError(f"{name_or_path}: no such profile file; give a path to a .toml file "
                               f"or a shipped profile name ({', '.join(shipped_profiles())})")
        return path
    shipped = shipped_profiles()
    if name_or_path in shipped:
        return shipped[name_or_path]
    hint = difflib.get_close_matches(name_or_path, list(shipped), n=1)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ProfileError(f"{name_or_path}: no such profile{did}; shipped profiles: {', '.join(shipped)}, "
                       "or give a path to a .toml file")


def load_profile(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read, override and validate a profile.

    Args:
      name_or_path: a shipped profile name (``smoke``) or a path to a TOML file.
      overrides: ``section.key=value`` strings, the value in TOML syntax
        (``model.d_model=[512,1024]``, ``run.dtype=bfloat16``).

    Returns:
      The validated Profile.

    Raises:
      ProfileError: with a one-line message naming file, key, value and remedy.
    """
    path = resolve_profile_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: TOML syntax error: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile: {e}") from None
    for item in overrides:
        apply_override(raw, item, str(path))
    return build_profile(raw, str(path))


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Apply one ``section.key=value`` override to a raw profile dict in place."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ProfileError(f"--set {item!r}: expected section.key=value, e.g. model.d_model=[512,1024]")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError as e:
        if text.strip()[:1] in ('[', '{', '"', "'"):  # meant as TOML (a list, a table, a quoted string)
            raise ProfileError(f"--set {item!r}: {text.strip()!r} is not a valid TOML value ({e}); e.g. "
                               "model.d_model=[512,1024] or run.dtype=\"bfloat16\"") from None
        value = text.strip()  # a bare word such as bfloat16 or fsdp
    if section == "mesh" and key == "strategies" and isinstance(value, str):
        value = [value]
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ProfileError(f"--set {item!r}: [{section}] is not a table")
    raw[section][key] = value


def _suggest(word: str, options) -> str:
    hint = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def build_profile(raw: dict, source: str = "<profile>") -> Profile:
    """Validate a raw profile dict (as read from TOML) into a Profile."""
    _refuse_non_finite(raw, source)
    for section in raw:
        if section not in _ALLOWED:
            raise ProfileError(f"{source}: unknown table [{section}]{_suggest(section, _ALLOWED)}; "
                               f"tables are {', '.join('[' + s + ']' for s in _ALLOWED)}")
        if not isinstance(raw[section], dict):
            raise ProfileError(f"{source}: '{section}' must be a table ([{section}])")
        for key in raw[section]:
            if key not in _ALLOWED[section]:
                raise ProfileError(f"{source}: unknown key [{section}] {key}{_suggest(key, _ALLOWED[section])}; "
                                   f"allowed: {', '.join(sorted(_ALLOWED[section]))}")
    merged = {s: {**copy.deepcopy(DEFAULTS[s]), **copy.deepcopy(raw.get(s, {}))} for s in DEFAULTS}
    v = _Validator(source)
    run = v.run(merged["run"], Path(source).stem)
    merged["run"]["name"] = run.name
    models = v.models(merged["model"])
    batch = v.batch(merged["batch"])
    mesh = v.mesh(merged["mesh"], models)
    v.cross(models, batch, mesh)
    return Profile(run=run, models=models, batch=batch, mesh=mesh, source=source, raw=merged)


def _refuse_non_finite(value: Any, source: str, where: str = "") -> None:
    """TOML has inf and nan; no profile value may be one."""
    if isinstance(value, float) and not math.isfinite(value):
        section, _, key = where.partition(".")
        raise ProfileError(f"{source}: [{section}] {key} = {value}: expected a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_non_finite(v, source, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for v in value:
            _refuse_non_finite(v, source, where)


def check_name(name: Any, where: str) -> str | None:
    """Why a run or size name cannot name a folder or file, or None.

    Names go into paths (report folders, traces): no path separators, no
    control characters, not empty, no leading dot.
    """
    if not isinstance(name, str):
        return "expected a string"
    if not name.strip():
        return "expected a non-empty name"
    bad = sorted({c for c in name if c in "/\\" or unicodedata.category(c) == "Cc"})
    if bad:
        return (f"a {where} goes into file paths: no path separators or control characters "
                f"(found {', '.join(repr(c) for c in bad)}); use letters, digits, '-', '_' and '.'")
    if name.startswith("."):
        return f"a {where} goes into file paths and may not start with '.'"
    return None


def profile_difference(a: Profile, b: Profile) -> str:
    """'' when two profiles define the same sweep; else the keys that differ, as text (a's value, then b's)."""
    if (a.run, a.models, a.batch, a.mesh) == (b.run, b.models, b.batch, b.mesh):
        return ""
    differences = []
    for section in DEFAULTS:
        ta, tb = a.raw.get(section, {}), b.raw.get(section, {})
        for key in dict.fromkeys([*ta, *tb]):
            if ta.get(key) != tb.get(key):
                differences.append(f"[{section}] {key} = {_toml_value(ta.get(key)) if key in ta else 'unset'} "
                                   f"there, {_toml_value(tb.get(key)) if key in tb else 'unset'} here")
    return "; ".join(differences[:3]) or "the two define different sweeps"


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, value: Any, want: str) -> None:
        raise ProfileError(f"{self.source}: {where} = {_show(value)}: {want}")

    def int_(self, where: str, value: Any, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, value, f"expected an integer >= {minimum}")
        if value < minimum:
            self.fail(where, value, f"expected an integer >= {minimum}")
        return value

    def choice(self, where: str, value: Any, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in options:
            hint = _suggest(value, options) if isinstance(value, str) else ""
            self.fail(where, value, f"expected one of {', '.join(options)}{hint}")
        return value

    def bool_(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(where, value, "expected true or false")
        return value

    def run(self, r: dict, default_name: str) -> RunSpec:
        name = r["name"] or default_name
        problem = check_name(name, "run name")
        if problem:
            fix = "" if r["name"] else " (it defaults to the profile's file name: set [run] name)"
            self.fail("[run] name", name, problem + fix)
        fraction = r["max_memory_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            self.fail("[run] max_memory_fraction", fraction, "expected a number in (0, 1]")
        return RunSpec(
            name=name,
            steps=self.int_("[run] steps", r["steps"], 2),
            warmup=self.int_("[run] warmup", r["warmup"], 0),
            dtype=self.choice("[run] dtype", r["dtype"], DTYPES),
            seed=self.int_("[run] seed", r["seed"], 0),
            remat=self.remat(r["remat"]),
            attention=self.choice("[run] attention", r["attention"], ATTENTION_IMPLS),
            causal_flops=self.bool_("[run] causal_flops", r["causal_flops"]),
            max_memory_fraction=float(fraction),
            scan_layers=self.bool_("[run] scan_layers", r["scan_layers"]),
            isolation=self.choice("[run] isolation", r["isolation"], ISOLATION_MODES),
            xla_flags=self.xla_flags(r["xla_flags"]),
        )

    def remat(self, value: Any) -> tuple[str, ...]:
        """A policy name or a list of them; true/false mean "full"/"none"."""
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail("[run] remat", value, f"expected a non-empty list drawn from {', '.join(REMAT_POLICIES)}")
        out = []
        for v in values:
            if isinstance(v, bool):
                v = "full" if v else "none"
            out.append(self.choice("[run] remat", v, REMAT_POLICIES))
        return tuple(dict.fromkeys(out))

    def xla_flags(self, value: Any) -> tuple[str, ...]:
        """A flag set or a list of them; each flag must start with --xla_."""
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            self.fail("[run] xla_flags", value, 'expected a list of flag sets, e.g. ["", "--xla_gpu_enable_latency_'
                                                'hiding_scheduler=true"]')
        out = []
        for flag_set in values:
            flags = flag_set.split()
            for flag in flags:
                if not flag.startswith("--xla_"):
                    self.fail("[run] xla_flags", flag_set, f"{flag!r} is not an XLA flag; each flag starts with "
                                                           "--xla_ and flags are separated by spaces")
                if "xla_force_host_platform_device_count" in flag:
                    self.fail("[run] xla_flags", flag_set, "the host device count is jaxscale's to set, not a "
                                                           "sweep axis")
            out.append(" ".join(flags))
        return tuple(dict.fromkeys(out))

    def models(self, m: dict) -> tuple[ModelSpec, ...]:
        defaults = {k: v for k, v in m.items() if k != "sizes"}
        sizes = m.get("sizes")
        if sizes is None:
            sizes = [{}]
        elif not isinstance(sizes, list) or not sizes or not all(isinstance(s, dict) for s in sizes):
            self.fail("[model] sizes", sizes, "expected a list of tables ([[model.sizes]] with name, d_model, ...)")
        specs: list[ModelSpec] = []
        names: dict[str, int] = {}
        for i, size in enumerate(sizes):
            where = f"[[model.sizes]] #{i + 1}" if m.get("sizes") is not None else "[model]"
            for key in size:
                if key not in _SIZE_KEYS:
                    raise ProfileError(f"{self.source}: unknown key {where} {key}{_suggest(key, _SIZE_KEYS)}; "
                                       f"allowed: {', '.join(sorted(_SIZE_KEYS))}")
            values = {**defaults, **size}
            if "d_ff" in size:
                values.pop("d_ff_ratio", None)
            name = values.pop("name", "")
            keys = [k for k in MODEL_KEYS if k in values]
            axes = []
            for k in keys:
                value = values[k]
                if isinstance(value, list):
                    if not value:
                        self.fail(f"{where} {k}", value, "expected a non-empty list")
                    axes.append(value)
                else:
                    axes.append([value])
            if name:
                problem = check_name(name, "size name")
                if problem:
                    self.fail(f"{where} name", name, problem)
                if name in names:
                    self.fail(f"{where} name", name, f"also the name of [[model.sizes]] #{names[name]}; "
                                                     "each size needs its own name")
                names[name] = i + 1
            for combo in itertools.product(*axes):
                specs.append(self.model(dict(zip(keys, combo)), name, where))
        unique = tuple(dict.fromkeys(specs))
        return unique

    def model(self, v: dict, name: str, where: str) -> ModelSpec:
        d = self.int_(f"{where} d_model", v["d_model"])
        heads = self.int_(f"{where} n_heads", v["n_heads"])
        if d % heads:
            self.fail(f"{where} n_heads", heads, f"must divide d_model = {d}")
        if "d_ff" in v:
            d_ff = self.int_(f"{where} d_ff", v["d_ff"])
        else:
            ratio = v.get("d_ff_ratio", 4)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                self.fail(f"{where} d_ff_ratio", ratio, "expected a positive number")
            d_ff = int(round(ratio * d))
            if d_ff != ratio * d:
                self.fail(f"{where} d_ff_ratio", ratio, f"d_ff_ratio × d_model = {ratio * d} is not an integer")
        seq = self.int_(f"{where} seq_len", v["seq_len"], 2)
        if not isinstance(name, str):
            self.fail(f"{where} name", name, "expected a string")
        return ModelSpec(d_model=d, n_layers=self.int_(f"{where} n_layers", v["n_layers"]), n_heads=heads,
                         d_ff=d_ff, seq_len=seq, vocab=self.int_(f"{where} vocab", v["vocab"], 2), name=name)

    def batch(self, b: dict) -> BatchSpec:
        if ("global_batch" in b) == ("per_device_batch" in b):
            raise ProfileError(f"{self.source}: [batch] needs exactly one of global_batch (strong scaling) "
                               "or per_device_batch (weak scaling)")
        key = "global_batch" if "global_batch" in b else "per_device_batch"
        values = b[key] if isinstance(b[key], list) else [b[key]]
        if not values:
            self.fail(f"[batch] {key}", b[key], "expected a number or a non-empty list of numbers")
        values = tuple(dict.fromkeys(self.int_(f"[batch] {key}", v) for v in values))
        return BatchSpec(**{key: values})

    def mesh(self, m: dict, models: tuple[ModelSpec, ...]) -> MeshSpec:
        devices = m["devices"]
        if isinstance(devices, int) and not isinstance(devices, bool):
            devices = [devices]
        if not isinstance(devices, list) or not devices:
            self.fail("[mesh] devices", devices, "expected a list of device counts, e.g. [1, 2, 4, 8]")
        devices = tuple(sorted(set(self.int_("[mesh] devices", n) for n in devices)))
        strategies = m["strategies"]
        if isinstance(strategies, str):
            strategies = [strategies]
        if not isinstance(strategies, list) or not strategies:
            self.fail("[mesh] strategies", strategies, f"expected a list drawn from {', '.join(STRATEGIES)}")
        strategies = tuple(dict.fromkeys(self.choice("[mesh] strategies", s, STRATEGIES) for s in strategies))
        model_axis = self.int_("[mesh] model_axis", m["model_axis"])
        topology = m["topology"]
        if not isinstance(topology, str):
            self.fail("[mesh] topology", topology, 'expected a target such as "v5e:16x16" or "h100:4x8"')
        if "fsdp_tp" in strategies:
            for spec in models:
                for key in ("n_heads", "d_ff"):
                    if getattr(spec, key) % model_axis:
                        self.fail("[mesh] model_axis", model_axis,
                                  f"must divide {key} = {getattr(spec, key)} of size {spec.size_name} for fsdp_tp")
            if not any(n % model_axis == 0 for n in devices):
                self.fail("[mesh] model_axis", model_axis,
                          f"divides none of the device counts {list(devices)}; fsdp_tp needs a multiple of it")
        return MeshSpec(devices=devices, strategies=strategies, model_axis=model_axis, topology=topology.strip())

    def cross(self, models, batch: BatchSpec, mesh: MeshSpec) -> None:
        for global_batch in batch.global_batch or ():
            for n in mesh.devices:
                data_sizes = {data_axis_size(s, n, mesh.model_axis) for s in mesh.strategies}
                for data in sorted(data_sizes - {None}):
                    if global_batch % data:
                        self.fail("[batch] global_batch", global_batch,
                                  f"not divisible by the data-axis size {data} at {n} devices; "
                                  f"use a multiple of {max(mesh.devices)}")


def data_axis_size(strategy: str, n_devices: int, model_axis: int) -> int | None:
    """Size of the data axis of a strategy's mesh, or None when it cannot be formed."""
    if strategy in ("dp", "fsdp"):
        return n_devices
    if strategy == "tp":
        return 1
    if n_devices % model_axis:
        return None
    return n_devices // model_axis


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")


def dump_toml(raw: dict) -> str:
    """Write a profile dict as TOML (tables of scalars, lists and [[model.sizes]])."""
    lines: list[str] = []
    for section, table in raw.items():
        sizes = table.get("sizes") if section == "model" else None
        lines.append(f"[{section}]")
        for key, value in table.items():
            if key != "sizes":
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for size in sizes or []:
            lines.append("[[model.sizes]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in size.items())
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
