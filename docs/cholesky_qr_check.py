"""Would a Cholesky QR serve the refresh's power step on real factors?  (docs/results.md, eleventh session)

Trains the embedded task (TinyGPT, 4 layers of width 256, context 128, 16 sequences a step, the
standard library as corpus) with a preset, and at the given steps takes, for every factor of side
256 and more, the power product ``W = X Q`` of the factor and its basis, as the refresh forms it
in float32. Its columns are scaled to unit norm first (the Q factor does not change, and near an
eigenbasis that makes ``W`` nearly orthogonal, the case most favourable to Cholesky). Printed per
factor: the eigenvalue range of ``X``, the largest condition number of the scaled ``W`` over the
stack, and per block either the column at which ``cholesky`` broke down or the largest entry of
``QᵀQ − I`` of ``Q = W R⁻¹``.

    python docs/cholesky_qr_check.py kl_shampoo 9,19,39,59
"""

import sys

import torch

import kronopt
from kronopt.app.task import TinyGPT, load_corpus


def check(opt: kronopt.KronOptimizer, step: int) -> None:
    for bucket in opt._buckets:  # a diagnostic: it reads the buckets' state directly
        state = bucket.state
        if state is None:
            continue
        for side in ("L", "R"):
            X, Q = getattr(state.factors, side, None), getattr(state.basis, "Q_" + side, None)
            if X is None or Q is None or X.shape[-1] < 256:
                continue
            W = X @ Q
            W = W / W.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
            eig = torch.linalg.eigvalsh(X.double())
            sv = torch.linalg.svdvals(W.double())
            C, info = torch.linalg.cholesky_ex(W.mT @ W)
            found = []
            for b in range(X.shape[0]):
                if info[b]:
                    found.append(f"breaks down at column {int(info[b])}")
                    continue
                Qc = torch.linalg.solve_triangular(C[b].mT, W[b], upper=True, left=False).double()
                found.append(f"|QᵀQ − I| {(Qc.mT @ Qc - torch.eye(Qc.shape[-1], dtype=Qc.dtype)).abs().max():.1e}")
            print(
                f"step {step} {side} {tuple(X.shape)}: eigenvalues {eig.min():.1e}…{eig.max():.1e}, "
                f"cond(W) ≤ {(sv[..., 0] / sv[..., -1]).max():.1e}; " + "; ".join(found),
                flush=True,
            )


def main(preset: str, at: set[int]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    corpus = load_corpus(None, context=128)
    model = TinyGPT(layers=4, width=256, heads=4, context=128)
    opt = kronopt.build(model.named_parameters(), preset)
    gen = torch.Generator().manual_seed(0)
    for step in range(max(at) + 1):
        x, y = corpus.batch("train", 16, 128, gen)
        opt.zero_grad()
        model.loss(x, y).backward()
        if step in at:
            check(opt, step)
        opt.step()


if __name__ == "__main__":
    steps = sys.argv[2] if len(sys.argv) > 2 else "9,19,39,59"
    main(sys.argv[1] if len(sys.argv) > 1 else "kl_shampoo", {int(s) for s in steps.split(",")})
