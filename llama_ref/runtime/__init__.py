"""How the computation is spread: one thread policy for BLAS and Numba (threads.py) and Meta's model-parallel
split across MPI ranks (parallel.py)."""
