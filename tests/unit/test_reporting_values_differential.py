"""Differential checks of the numbers the reporting tools give (``inspect``/``saved_views``, ``kronopt spectrum``,
``kronopt fisher``), each against an independent float64 computation.

Found by a hunt and fixed (each pinned by a test that failed on the code before the fix):

* ``saved_views`` (so ``kronopt spectrum --state``) keeps one of two parameters whose name two param groups
  share: the other is silently dropped, where ``inspect()`` qualifies both (``param_groups[g].name``);
* ``saved_views`` lists parameters no counted call has reached (their fresh state), which ``inspect()``
  leaves out: ``kronopt spectrum --state`` prints a perfectly flat spectrum at step 0 for a never-trained layer;
* ``fisher.track`` hands the estimator ``ctx.step = 1`` with the first gradient, so the KL estimator never runs
  its first call (kl_shampoo.md §5) and ``kronopt fisher --estimators kl`` measures another estimator than the
  optimizer's.
"""

import io
import math

import pytest
import torch

import kronopt
from kronopt import compose
from kronopt.app import cli, spectrum
from kronopt.app import fisher as F
from kronopt.inspection import saved_views

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _reloaded(opt):
    """``opt.state_dict()`` through ``torch.save``/``torch.load(weights_only=True)``, as ``--state`` reads it."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- saved_views / kronopt spectrum --state against inspect() and a hand-kept EMA -----------------------------


def test_saved_spectra_keep_both_parameters_whose_name_two_groups_share():
    """Two modules' ``named_parameters()`` as two param groups: both are called ``weight``. ``inspect()`` names
    them ``param_groups[0].weight`` and ``param_groups[1].weight``; the spectra read back from the saved state
    must be those two, each equal to ``eigvalsh`` of the EMA of GGᵀ / GᵀG kept here in float64 (Shampoo, eigh
    basis refreshed every step, factors from zero with β = 0.95)."""
    a, b = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(5, 3, bias=False)
    opt = kronopt.build([{"params": list(a.named_parameters())}, {"params": list(b.named_parameters()), "lr": 1e-3}],
                        "shampoo", **{"refresh.every": 1})
    gen = torch.Generator().manual_seed(0)
    ema = {0: [torch.zeros(3, 3, dtype=F64), torch.zeros(4, 4, dtype=F64)],
           1: [torch.zeros(3, 3, dtype=F64), torch.zeros(5, 5, dtype=F64)]}
    for _ in range(5):
        for g, p in ((0, a.weight), (1, b.weight)):
            G = torch.randn(p.shape, generator=gen)
            p.grad = G.clone()
            ema[g][0] = 0.95 * ema[g][0] + 0.05 * G.double() @ G.double().T
            ema[g][1] = 0.95 * ema[g][1] + 0.05 * G.double().T @ G.double()
        opt.step()
    live = {(r.name, r.side) for r in spectrum.spectra_from_optimizer(opt, 5)}
    saved = {(r.name, r.side): r for r in spectrum.spectra_from_state_dict(_reloaded(opt))}
    assert live == {(f"param_groups[{g}].weight", s) for g in (0, 1) for s in ("left", "right")}
    assert set(saved) == live
    for g in (0, 1):
        for i, side in enumerate(("left", "right")):
            want = torch.linalg.eigvalsh(ema[g][i]).flip(0)
            got = saved[(f"param_groups[{g}].weight", side)]
            assert got.step == 5
            torch.testing.assert_close(got.eigvals, want, rtol=2e-3, atol=1e-6)


def test_spectrum_of_a_saved_state_leaves_out_parameters_never_stepped(tmp_path, capsys):
    """KL-Shampoo on three weights of which only ``a`` ever gets a gradient: live, ``inspect()`` (and so the
    recorder) shows ``a`` alone, at step 3; ``kronopt spectrum --state`` must print the same factors, not
    ``b``'s and ``c``'s ``init_factor`` (0.1 everywhere: tail AM/GM exactly 1, a flat tail that never existed)."""
    a, b, c = (torch.nn.Parameter(torch.randn(*s)) for s in ((4, 3), (4, 3), (5, 2)))
    opt = kronopt.build([("a", a), ("b", b), ("c", c)], "kl_shampoo")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.grad = torch.randn(4, 3, generator=gen)
        opt.step()
    assert set(opt.inspect()) == {"a"}
    assert {r.name for r in spectrum.spectra_from_optimizer(opt, 3)} == {"a"}
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    assert set(saved_views(_reloaded(opt))) == {"a"}
    assert cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert sorted(line.split()[0] + " " + line.split()[1] for line in rows) == ["a (left)", "a (right)"]
    assert all(int(line.split()[2]) == 3 for line in rows)


# -- kronopt fisher: the KL estimator's first call ------------------------------------------------------------


def test_fisher_lab_drives_kl_from_its_first_call_as_the_optimizer_does():
    """kl_shampoo.md §5: the first call sets L = (1−ρ) G Gᵀ / n and R = (1−ρ) Gᵀ G / m (λ stays
    ``init_factor``). ``track("kl", …)`` after one gradient must hold those factors, and after each later
    gradient the factors kronopt's own pipeline holds (``compose.step`` of kl_shampoo on one block, float64,
    with the lab's eigh basis refreshed after every update)."""
    m, n, rho = 4, 6, 0.9
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(m, n, generator=gen, dtype=F64) for _ in range(3)]
    history = F.track("kl", grads, beta=rho)
    G = grads[0]
    torch.testing.assert_close(history[0][0], (1 - rho) * G @ G.T / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(history[0][1], (1 - rho) * G.T @ G / m, rtol=1e-12, atol=1e-14)
    cfg = kronopt.resolve("kl_shampoo", **{"factors.beta": rho, "refresh.every": 1, "basis.type": "eigh"}).bound()
    layout = F._layout(cfg, m, n)
    state = compose.init_state(cfg, layout, dtype=F64, device=torch.device("cpu"))
    for k, Gk in enumerate(grads):
        _, state = compose.step(cfg, layout, state, Gk.unsqueeze(0))
        L, R = cfg.factors.factors(state.factors)
        torch.testing.assert_close(history[k][0], L[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(history[k][1], R[0], rtol=1e-10, atol=1e-12)


# -- kronopt fisher: the Hessian experiment's final numbers ---------------------------------------------------


def test_hessian_lab_final_numbers_equal_an_autograd_hessian_and_the_real_optimizer():
    """The Hessian lab's final row (val accuracy, ‖H − L⊗R‖², e_s of L⊗R, ‖H − Ĥ_E‖², e_s of Ĥ_E, NKP floor)
    recomputed here: the classifier trained by ``kronopt.build(..., "soap")`` on the same batches, H by
    ``torch.autograd.functional.hessian`` of the mean cross-entropy (row-major vec), L, R, Q and V from
    ``inspect()``, V̂ = V / (1 − β₂ᵗ) (dykaf.md §14), the floor from the singular values of 𝓡(H).

    Fails on: metrics against the Hessian at another W, an unrearranged or transposed H, a second moment
    without (or with another) bias correction, the floor from σ₁ of H instead of 𝓡(H), accuracy on the
    training rows."""
    rows, classes, batch, lr = 300, 8, 100, 0.01
    lab = F.hessian_experiment(["soap"], rows=rows, epochs=1, lrs=[lr])["final"][0]
    X, y = F.byte_dataset(rows, classes=classes)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(rows, generator=gen)
    train_rows, val_rows = order[: int(0.7 * rows)], order[int(0.7 * rows): int(0.7 * rows) + int(0.2 * rows)]
    bound = math.sqrt(6.0 / (classes + F.FEATURES))
    W = torch.nn.Parameter((torch.rand(classes, F.FEATURES, generator=gen, dtype=F64) * 2 - 1) * bound)
    opt = kronopt.build([("W", W)], "soap", **F.hessian_settings(lr, {}))
    for i in range(0, len(train_rows), batch):
        idx = train_rows[i:i + batch]
        with torch.no_grad():  # the closed-form gradient, as the lab's (autograd's differs in the last bit, and
            P = torch.softmax(X[idx] @ W.mT, dim=-1)  # SOAP's Adam turns that into another trajectory)
            P[torch.arange(len(idx)), y[idx]] -= 1.0
            W.grad = P.mT @ X[idx] / len(idx)
        opt.step()
    Wd = W.detach()
    H = torch.autograd.functional.hessian(
        lambda w: torch.nn.functional.cross_entropy(X[train_rows] @ w.reshape(classes, -1).mT, y[train_rows]),
        Wd.reshape(-1))
    view = opt.inspect()["W"]
    K = torch.kron(view.left.factor, view.right.factor)
    Q = torch.kron(view.left.basis, view.right.basis)
    H_E = Q @ torch.diag((view.second_moment / (1 - 0.999**view.step)).reshape(-1)) @ Q.T

    def e_s(A, B):
        return math.sqrt(max(0.0, 1 - float((A * B).sum()) ** 2 / float((A * A).sum() * (B * B).sum())))

    s = torch.linalg.svdvals(H.reshape(classes, F.FEATURES, classes, F.FEATURES).permute(0, 2, 1, 3)
                             .reshape(classes**2, F.FEATURES**2))
    want = {
        "val_accuracy": float(((X[val_rows] @ Wd.mT).argmax(-1) == y[val_rows]).double().mean()),
        "factor_diff2": float((H - K).square().sum()), "factor_e_s": e_s(H, K),
        "eigen_diff2": float((H - H_E).square().sum()), "eigen_e_s": e_s(H, H_E),
        "floor": float(s[1:].square().sum().sqrt() / s.norm()),
    }
    for key, value in want.items():
        assert lab[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
