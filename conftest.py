"""Each pytest-xdist worker computes on one thread (the processes it starts inherit it): two workers on
two cores, rather than four threads taking turns on them."""
import os

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
