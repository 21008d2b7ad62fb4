"""Test setup: 8 virtual CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Calibrations and the compilation cache of tests stay out of the user's cache.
os.environ.setdefault("JAXSCALE_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
