"""Every test sees 8 CPU devices, so that sharding is exercised for real on any machine."""

import os

from lm import allocator

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The binaries the tests start then run as they would restart themselves, without the restart
# (tests/test_allocator.py checks the restart itself).
os.environ.update(allocator.environment(os.environ))
# Nor do they fill the user's compilation cache (tests/test_train.py checks the cache itself).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")
