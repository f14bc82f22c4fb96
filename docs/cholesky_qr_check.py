"""Would a Cholesky QR serve the refresh's power step on real factors?  (docs/results.md; docs/performance_log.md, eleventh session)

Trains the embedded task (TinyGPT, 4 layers of width 256, context 128, 16 sequences a step, the
standard library as corpus) with a preset for a number of steps. Each time a refresh factorises
its power product (``linalg.q_factor``, called by ``sorted_power_step`` on ``(X Q)[:, π]``, the
columns in the order the refresh sorts them), this takes a copy of that matrix ``W`` and, for
sides of 256 and more, tries a Cholesky QR on it in its own dtype (float32): the columns scaled
to unit norm first (Q does not change, and near an eigenbasis that makes ``W`` nearly orthogonal,
the case most favourable to Cholesky), then ``R`` from the Cholesky factor of ``WᵀW`` and
``Q = W R⁻¹``. Printed per refresh and stack: the largest condition number of the scaled ``W``,
the largest ``|QᵀQ − I|`` of the Householder Q the refresh returns, and per block either the
column at which ``cholesky`` broke down or the largest entry of ``|QᵀQ − I|`` of the Cholesky Q.
A tally by side closes the output.

    python docs/cholesky_qr_check.py kl_shampoo 60
"""

import sys
from collections import Counter

import torch

import kronopt
from kronopt import linalg
from kronopt.app.task import TinyGPT, load_corpus


def _off_identity(Q: torch.Tensor) -> torch.Tensor:
    """Per block, the largest entry of ``|QᵀQ − I|``, in float64."""
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))


def cholesky_qr_report(W: torch.Tensor, householder: torch.Tensor) -> tuple[str, list[bool]]:
    """One line on the Cholesky QR of each block of ``W (b n n)``, and per block whether it broke down."""
    W = W / W.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
    sv = torch.linalg.svdvals(W.double())
    C, info = torch.linalg.cholesky_ex(W.mT @ W)
    found, broke = [], []
    for b in range(W.shape[0]):
        broke.append(bool(info[b]))
        if info[b]:
            found.append(f"breaks down at column {int(info[b])}")
        else:
            Q = torch.linalg.solve_triangular(C[b].mT, W[b], upper=True, left=False)
            found.append(f"|QᵀQ − I| {_off_identity(Q).item():.1e}")
    head = (
        f"cond(W) ≤ {(sv[..., 0] / sv[..., -1]).max():.1e}, "
        f"Householder |QᵀQ − I| ≤ {_off_identity(householder).max():.1e}; "
    )
    return head + "; ".join(found), broke


def main(preset: str, steps: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    corpus = load_corpus(None, context=128)
    model = TinyGPT(layers=4, width=256, heads=4, context=128)
    opt = kronopt.build(model.named_parameters(), preset)
    gen = torch.Generator().manual_seed(0)
    at = {"step": 0}
    tally: Counter[tuple[int, bool]] = Counter()
    householder_q_factor = linalg.q_factor

    def watched(P: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        W = P.clone()  # the refresh may factorise P in its own memory
        Q = householder_q_factor(P, overwrite=overwrite)
        if W.shape[-1] >= 256 and W.shape[-1] == W.shape[-2]:
            line, broke = cholesky_qr_report(W, Q)
            tally.update((W.shape[-1], b) for b in broke)
            print(f"step {at['step']} {tuple(W.shape)}: {line}", flush=True)
        return Q

    linalg.q_factor = watched  # sorted_power_step looks it up in the module at each call
    try:
        for step in range(steps):
            at["step"] = step
            x, y = corpus.batch("train", 16, 128, gen)
            opt.zero_grad()
            model.loss(x, y).backward()
            opt.step()
    finally:
        linalg.q_factor = householder_q_factor
    for side in sorted({s for s, _ in tally}):
        print(f"side {side}: Cholesky broke down on {tally[side, True]} of {tally[side, True] + tally[side, False]} blocks")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kl_shampoo", int(sys.argv[2]) if len(sys.argv) > 2 else 60)
