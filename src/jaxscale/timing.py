"""Warm up, then time a step: raw per-step samples first, statistics after.

Timing is pipelined. Steps are dispatched asynchronously with two in flight;
the host blocks on step i's output only after step i+1 has been queued, and
records the moment each step's output becomes ready. A step's duration is the
interval between two consecutive completions. Because the next step is always
queued before the host waits, the device never idles on the host, so host
dispatch overhead does not inflate short steps, yet every step still gets its
own sample for the spread (p10, p90, cv). ``time_blocking`` (dispatch, block,
repeat) is kept for comparison: it includes the dispatch latency in each step.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step wall times of the timed steps and their statistics (seconds)."""

    samples_s: tuple[float, ...]
    warmup_s: float = 0.0  # wall time of the untimed warm-up steps (first execution included)

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.samples_s))

    @property
    def mean_s(self) -> float:
        return float(np.mean(self.samples_s))

    @property
    def p10_s(self) -> float:
        return float(np.percentile(self.samples_s, 10))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.samples_s, 90))

    @property
    def cv(self) -> float:
        """Coefficient of variation: sample standard deviation / mean."""
        if len(self.samples_s) < 2:
            return 0.0
        return float(np.std(self.samples_s, ddof=1) / np.mean(self.samples_s))


def time_pipelined(dispatch: Callable[[int], Any], n_steps: int, warmup: int) -> Timing:
    """Time ``n_steps`` calls of ``dispatch(i)`` after ``warmup`` untimed ones.

    Args:
      dispatch: enqueues step i and returns something to block on (its loss).
        Successive steps must depend on each other (donated state), so the device
        runs them in order.
      n_steps: number of timed steps (samples).
      warmup: untimed steps run first; at least one is always run, since the
        first call also pays one-time costs (allocation, autotuning).

    Returns:
      Timing with ``n_steps`` samples.
    """
    i = 0
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        out = dispatch(i)
        i += 1
    jax.block_until_ready(out)
    warmup_s = time.perf_counter() - start
    # n_steps + 1 completions give n_steps intervals. Each is stamped only after
    # its successor was dispatched, the last included (an untimed tail step), so
    # every interval has the same structure whether the backend dispatches
    # asynchronously or runs a step inside the dispatch call.
    pending = collections.deque([dispatch(i)])
    i += 1
    stamps = []
    while len(stamps) < n_steps + 1:
        pending.append(dispatch(i))
        i += 1
        jax.block_until_ready(pending.popleft())
        stamps.append(time.perf_counter())
    jax.block_until_ready(pending.popleft())
    return Timing(tuple(float(b - a) for a, b in zip(stamps, stamps[1:])), warmup_s=warmup_s)


def time_blocking(dispatch: Callable[[int], Any], n_steps: int, warmup: int) -> Timing:
    """Per-step blocking: dispatch, wait, repeat. Includes host dispatch latency."""
    i = 0
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(dispatch(i))
        i += 1
    samples = []
    for _ in range(n_steps):
        start = time.perf_counter()
        jax.block_until_ready(dispatch(i))
        samples.append(time.perf_counter() - start)
        i += 1
    return Timing(tuple(samples))
