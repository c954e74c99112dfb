"""The pure JAX library: mesh, sharding rules, remat, optimizers, the train state and the step.

Nothing here does I/O or knows about runs, tasks' data or the command line.
"""
