"""A run shared by the tests of the eigenvalue rule's momentum forms (``inner.momentum_basis``)."""

import torch

import kronopt


def run_momentum_basis(preset, basis, shapes, steps=23, **overrides):
    """``steps`` float64 steps of ``preset`` with ``inner.momentum_basis = basis`` and a refresh every 3 on
    parameters of ``shapes``, from fixed seeds; returns ``(optimizer, parameters)``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    opt = kronopt.build(
        [(f"w{i}", p) for i, p in enumerate(params)], preset,
        **{"inner.momentum_basis": basis, "refresh.every": 3, "state_dtype": "float64", **overrides},
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return opt, params
