"""This process's set-up before JAX starts: virtual host devices, quiet plugins, the compilation cache,
whether a sweep's points run in worker processes or here, and what Ctrl-C does (ctrl_c_held, StopFlag).

Everything here runs before any JAX backend exists (XLA reads its flags, and
the TPU and CUDA plugins their settings, once per process), so this module
imports no JAX at its top.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from jaxscale.config import ADDED_XLA_FLAGS_ENV, ProfileError
from jaxscale.targets import quiet_plugins

HOST_DEVICES = 8

# Device nodes of accelerators JAX can drive: NVIDIA GPUs, TPUs (accel for v4 and
# earlier, vfio for v5 and later), AMD GPUs.
ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")


def accelerator_present() -> bool:
    """True where JAX may find a GPU or TPU, judged without initializing any backend."""
    platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    if platforms and platforms <= {"cpu"}:
        return False
    return any(os.path.exists(node) for node in ACCELERATOR_NODES)


def choose_isolation(run) -> str:
    """``process`` or ``none`` for a RunSpec, before anything initializes JAX.

    ``auto`` means worker processes wherever the backend keeps allocator
    statistics (a GPU or TPU is present), and in-process on the CPU, where
    there is no allocator peak to protect and a worker still costs its backend
    start and cache load (about 0.5 s a point on 2 cores, a third more time
    for the smoke profile with a warm cache). Non-empty XLA flag sets always
    need workers: XLA reads its flags once per process.

    Raises:
      ProfileError: flag sets with ``isolation = "none"``.
    """
    flagged = [f for f in run.xla_flags if f]
    if flagged:
        if run.isolation == "none":
            raise ProfileError(f"[run] isolation = 'none' with [run] xla_flags = {list(run.xla_flags)}: XLA reads "
                               "its flags once per process, so flag sets need a worker process per point; set "
                               "[run] isolation = \"process\" or \"auto\" (--set run.isolation=process)")
        return "process"
    if run.isolation != "auto":
        return run.isolation
    return "process" if accelerator_present() else "none"



def cache_dir() -> Path:
    """jaxscale's cache folder: $JAXSCALE_CACHE_DIR, else $XDG_CACHE_HOME/jaxscale (~/.cache/jaxscale)."""
    base = os.environ.get("JAXSCALE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxscale")
    return Path(base)


def configure_compile_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache under jaxscale's cache folder (before the first compile)."""
    if enabled and os.environ.get("JAXSCALE_COMPILE_CACHE", "1") != "0":
        import jax

        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def prepare_process(compile_cache: bool = True, compile_only: bool = False) -> None:
    """Set up XLA before JAX initializes its backends.

    ``compile_only`` (a plan): JAX opens the CPU only, unless JAX_PLATFORMS says
    otherwise; no local accelerator is initialized (and the CUDA plugin then
    skips its check for CUDA libraries a compile does not need). JAX's
    persistent compilation cache cannot load an executable compiled for a
    device it has no client for (it warns and compiles again), so a plan passes
    ``compile_cache=False``.

    Unless the user's XLA_FLAGS set a host device count, the host platform gets 8
    virtual devices, so a machine without an accelerator can still run
    multi-device meshes (the flag only affects the CPU backend; the user's other
    flags are kept); JAXSCALE_ADDED_XLA_FLAGS says it was jaxscale's doing, so
    records keep it apart from the user's flags. The persistent compilation
    cache is JAX's own.

    JAX is first imported here with Ctrl-C held back until it has loaded: an
    import interrupted inside jaxlib's extension modules can crash the
    interpreter (SIGSEGV) where it should raise KeyboardInterrupt, and the
    folder a run has just claimed would then be left behind.
    """
    if compile_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    user = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in user:
        flag = f"--xla_force_host_platform_device_count={HOST_DEVICES}"
        os.environ["XLA_FLAGS"] = f"{user} {flag}".strip()
        os.environ[ADDED_XLA_FLAGS_ENV] = flag
    with ctrl_c_held():
        quiet_plugins()  # first: it sets JAX_PLATFORMS, which JAX reads when imported
        importlib.import_module("jax")
    configure_compile_cache(compile_cache)


@contextlib.contextmanager
def ctrl_c_held():
    """A Ctrl-C inside the block is raised once it ends (in the main thread; elsewhere as it comes): for steps
    that must not stop halfway (JAX loading; a report folder claimed but not yet in the hands that remove it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class StopFlag:
    """Ctrl-C in a loop over points (a sweep, a plan). First: finish the current point, then stop. Second: abort.

    The second raises KeyboardInterrupt wherever Python is; where it cannot be
    raised (a garbage-collection callback, a finalizer) Python would print it
    and go on, so that is kept quiet here and ``abort`` makes the loop raise it
    once the point returns. The first only sets ``stop``, which no callback can
    swallow: a KeyboardInterrupt at once would be lost the same way (XLA's
    garbage-collection callback runs often while a point compiles).
    """

    def __init__(self):
        self.stop = False
        self.abort = False
        self._previous = None
        self._hook = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handle(self, signum, frame):
        if self.stop:
            self.abort = True
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: stopping after the current point (again to abort now)", file=sys.stderr)

    def stopped(self) -> bool:
        """Whether to stop before the next point; raises KeyboardInterrupt for a second Ctrl-C that could not be
        raised where it arrived."""
        if self.abort:
            raise KeyboardInterrupt
        return self.stop

    def _unraisable(self, info):
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self._hook(info)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._hook
