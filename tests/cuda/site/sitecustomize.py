"""Applies the CUDA simulation pieces named in SSL3D_CUDA_SIM to every Python process started with it (tests only).

Python imports ``sitecustomize`` at start-up from the path; the tests put this folder first on PYTHONPATH for the
processes they launch (``tests/cuda/cudasim.py: sim_env``), so launchers' ranks inherit the simulation too.
"""

import os
import sys

if os.environ.get("SSL3D_CUDA_SIM"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cudasim

    cudasim.apply(*[p for p in os.environ["SSL3D_CUDA_SIM"].split(",") if p])
