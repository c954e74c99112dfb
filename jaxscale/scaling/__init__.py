"""Scaling laws: plan sweeps of model size against data, and fit laws to their final losses.

`sweep` plans and runs the sweeps (`jaxscale sweep`); `fit` reads a sweep's (or a CSV's) points
and fits L(N, D) (Chinchilla approaches 2 and 3); `report` is `jaxscale fit`; `plots` draws the
fits. Import the submodules directly.
"""
