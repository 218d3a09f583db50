"""Refinement after the ensemble (GitHub issue #7): `refiner` (the phases, fitting), `boost` (phase 1),
`embed` (phase 2's embedders and prototypes), `biofilter` (phase 3), `features` and `models` (per-cell
morphology and per-class models). Import the submodules; this package imports nothing by itself, so
taking the logit offsets does not import Numba and the feature kernels.
"""
