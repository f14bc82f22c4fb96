"""Self-checks of the clean-room float64 references in this folder (they never import kronopt).

Each test checks a property that a wrong reference would fail: conventions of the first call, equality with a
hand-written Adam or with torch.optim.Adam/AdamW where the spec says they must agree, closed forms for simple
gradients, invariances (basis permutation/sign, transposition), and orthonormality of the bases.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from .shampoo import ShampooState, make_shampoo_hyper, shampoo_reference, shampoo_update
from .soap import SoapState, make_soap_hyper, soap_reference, soap_update

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# helpers


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def problem(shapes, calls: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [randn(gen, *s) for s in shapes]
    grads = [[randn(gen, *s) for s in shapes] for _ in range(calls)]
    return params, grads


def random_orthogonal(gen: torch.Generator, n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(gen, n, n))
    return q * torch.sign(torch.diag(r))


def soap_adam_by_hand(w0, grads, *, lr, b1, b2, eps, wd, correct_bias=True, normalize=False):
    """Adam with the SOAP conventions of spec §10, written independently of the reference:
    first call skipped, eps added to the raw sqrt(v), decay with the raw lr applied after the step."""
    w = w0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    out = [w.clone()]  # the first call does nothing
    for t, g in enumerate(grads[1:], start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        n = m / (v.sqrt() + eps)
        if normalize:
            n = n / (1e-30 + n.pow(2).mean().sqrt())
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
        w = w - step * n
        w = w - lr * wd * w
        out.append(w.clone())
    return out


def eigh_descending(x: torch.Tensor) -> torch.Tensor:
    _, q = torch.linalg.eigh(x)
    return q.flip(1)


def assert_orthonormal(q: torch.Tensor, tol: float = 1e-12):
    eye = torch.eye(q.shape[1], dtype=F64)
    assert torch.allclose(q.T @ q, eye, atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# SOAP reference


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_soap_first_call_leaves_params_bit_identical(wd):
    params, grads = problem([(5, 3), (4, 4), (7,), (2, 9)], calls=2, seed=0)
    hist = soap_reference(params, grads, weight_decay=wd)
    for p, after_first in zip(params, hist[0]):
        assert after_first.dtype == F64
        assert torch.equal(after_first, p)
    for p, after_second in zip(params, hist[1]):
        assert not torch.allclose(after_second, p)


def test_soap_first_call_state():
    gen = torch.Generator().manual_seed(1)
    w, g = randn(gen, 6, 4), randn(gen, 6, 4)
    hp = make_soap_hyper(betas=(0.9, 0.8))  # rho = beta2 = 0.8
    st = SoapState()
    soap_update(w, g, st, hp)
    assert st.t == 0
    assert torch.count_nonzero(st.m) == 0 and torch.count_nonzero(st.v) == 0
    assert torch.allclose(st.L, 0.2 * g @ g.T, rtol=1e-14, atol=0)
    assert torch.allclose(st.R, 0.2 * g.T @ g, rtol=1e-14, atol=0)
    for q, x in ((st.Q_L, st.L), (st.Q_R, st.R)):
        assert_orthonormal(q)
        rayleigh = torch.diag(q.T @ x @ q)
        assert torch.all(rayleigh[:-1] >= rayleigh[1:] - 1e-12), "columns must be in descending eigenvalue order"
    # the four non-zero eigenvalues of L are those of R
    top = torch.diag(st.Q_L.T @ st.L @ st.Q_L)[:4]
    assert torch.allclose(top, torch.linalg.eigvalsh(st.R).flip(0), rtol=1e-10)
    soap_update(w, g, st, hp)
    assert st.t == 1


def test_soap_step_counter_and_1d_has_no_factors():
    params, grads = problem([(5,), (3, 4)], calls=7, seed=2)
    hp = make_soap_hyper()
    states = [SoapState(), SoapState()]
    ws = list(params)
    for call in grads:
        ws = [soap_update(w, g, s, hp) for w, g, s in zip(ws, call, states)]
    assert [s.t for s in states] == [6, 6]
    assert states[0].L is None and states[0].R is None and states[0].Q_L is None and states[0].Q_R is None
    assert ws[0].shape == (5,)


def test_soap_second_call_closed_form():
    # 1-D, constant gradient g: after the second call m = (1-b1) g, v = (1-b2) g^2 and
    # W1 = W0 - lr sqrt(1-b2)/(1-b1) * (1-b1) g / (sqrt(1-b2)|g| + eps)  (then decay).
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-3, 0.1
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    g = torch.tensor([0.3, -0.02, 4.0], dtype=F64)
    hist = soap_reference([w0], [[g], [g]], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    expected = w0 - lr * math.sqrt(1 - b2) * g / (math.sqrt(1 - b2) * g.abs() + eps)
    expected = expected * (1 - lr * wd)
    assert torch.allclose(hist[1][0], expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "correct_bias, normalize", [(True, False), (False, False), (True, True), (False, True)]
)
def test_soap_unfactored_equals_hand_written_soap_adam(correct_bias, normalize):
    shapes = [(5, 3), (4, 4), (6,)]
    params, grads = problem(shapes, calls=15, seed=3)
    kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05)
    hist = soap_reference(
        params, grads, max_precond_dim=0, precondition_frequency=2, correct_bias=correct_bias,
        normalize_grads=normalize, **kw,
    )
    for i in range(len(shapes)):
        expected = soap_adam_by_hand(
            params[i], [call[i] for call in grads], lr=kw["lr"], b1=0.9, b2=0.95, eps=kw["eps"],
            wd=kw["weight_decay"], correct_bias=correct_bias, normalize=normalize,
        )
        for k in range(len(grads)):
            assert torch.allclose(hist[k][i], expected[k], rtol=1e-13, atol=1e-14), (i, k)


def test_soap_unfactored_is_not_torch_adamw():
    # spec §10: the SOAP conventions differ from torch.optim.AdamW; the reference must not silently be AdamW
    params, grads = problem([(4, 3)], calls=6, seed=4)
    hist = soap_reference(params, grads, max_precond_dim=0, eps=1e-3)
    p = params[0].clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.95, 0.95), eps=1e-3, weight_decay=0.01)
    for call in grads:
        p.grad = call[0].clone()
        opt.step()
    assert not torch.allclose(hist[-1][0], p.detach(), atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_soap_normalize_grads_gives_rms_equal_to_step_size(normalize):
    params, grads = problem([(6, 5), (7,)], calls=8, seed=5)
    lr, b1, b2 = 0.01, 0.9, 0.99
    for correct_bias in (True, False):
        hist = soap_reference(
            params, grads, lr=lr, betas=(b1, b2), weight_decay=0.0, precondition_frequency=3,
            normalize_grads=normalize, correct_bias=correct_bias,
        )
        for i in range(2):
            for t in range(1, len(grads)):
                rms = (hist[t][i] - hist[t - 1][i]).pow(2).mean().sqrt().item()
                step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
                if normalize:
                    assert rms == pytest.approx(step, rel=1e-10)
                elif t >= 2:  # (at t = 1 with these betas |m|/sqrt(v) = 1 entrywise, like signSGD)
                    assert rms != pytest.approx(step, rel=1e-3)


@pytest.mark.parametrize("shape, max_dim", [((6, 4), 10000), ((4, 4), 10000), ((3, 20), 5), ((20, 3), 5)])
def test_soap_fixed_basis_equals_adam_on_rotated_gradients(shape, max_dim):
    # f larger than the run: the basis is the first-call eigh basis throughout (spec §12.5), and SOAP is then
    # SOAP-Adam on Q_L^T G Q_R, mapped back with Q_L (.) Q_R^T.
    calls = 12
    params, grads = problem([shape], calls=calls, seed=6)
    g0 = grads[0][0]
    rho = 0.9
    rows, cols = shape
    hp = make_soap_hyper(lr=0.01, betas=(0.9, 0.97), shampoo_beta=rho, eps=1e-7, weight_decay=0.02,
                         precondition_frequency=calls + 5, max_precond_dim=max_dim)
    st = SoapState()
    w = soap_update(params[0], g0, st, hp)
    hist = [w]
    assert (st.Q_L is None) == (rows > max_dim) and (st.Q_R is None) == (cols > max_dim)
    # the first-call bases are eigenbases of (1-rho) G0 G0^T / (1-rho) G0^T G0, eigenvalues descending. Their
    # null-space columns are fixed by round-off (spec §8), so the hand-written Adam below reuses them.
    for q, x in ((st.Q_L, g0 @ g0.T), (st.Q_R, g0.T @ g0)):
        if q is None:
            continue
        assert_orthonormal(q)
        d = q.T @ ((1 - rho) * x) @ q
        assert torch.allclose(d, torch.diag(torch.diag(d)), atol=1e-13)
        assert torch.all(torch.diag(d)[:-1] >= torch.diag(d)[1:] - 1e-13)
        expected_eigs = torch.linalg.eigvalsh((1 - rho) * x).flip(0)
        assert torch.allclose(torch.diag(d), expected_eigs, atol=1e-13)
    q_l = st.Q_L.clone() if st.Q_L is not None else torch.eye(rows, dtype=F64)
    q_r = st.Q_R.clone() if st.Q_R is not None else torch.eye(cols, dtype=F64)
    for call in grads[1:]:
        w = soap_update(w, call[0], st, hp)
        hist.append(w)
        for q, ref in ((st.Q_L, q_l), (st.Q_R, q_r)):
            assert q is None or torch.equal(q, ref)  # never refreshed

    # hand-written: Adam in rotated coordinates, rotated back; decay acts on W (rotation-invariant)
    w = params[0].clone()
    m = torch.zeros(shape, dtype=F64)
    v = torch.zeros(shape, dtype=F64)
    for t, call in enumerate(grads[1:], start=1):
        g_rot = q_l.T @ call[0] @ q_r
        m = 0.9 * m + 0.1 * g_rot
        v = 0.97 * v + 0.03 * g_rot**2
        step = 0.01 * math.sqrt(1 - 0.97**t) / (1 - 0.9**t)
        w = w - step * (q_l @ (m / (v.sqrt() + 1e-7)) @ q_r.T)
        w = w - 0.01 * 0.02 * w
        assert torch.allclose(hist[t], w, rtol=1e-11, atol=1e-12), t


def test_soap_refresh_follows_reordered_eigenvectors():
    # G_k = U diag(s_k) V^T with fixed U, V: every factor has eigenvectors U (left) and V (right), so every basis
    # is a signed permutation of U / V, and SOAP must equal SOAP-Adam on the diagonal coordinates s_k paired
    # with (u_i, v_i) -- however the refreshes reorder the columns. The schedule of s_k makes the order of
    # the factor eigenvalues change over time, so v must be permuted (on the right axes) and m rotated.
    gen = torch.Generator().manual_seed(7)
    n = 4
    u, vv = random_orthogonal(gen, n), random_orthogonal(gen, n)
    schedule = [[4.0, 3.0, 2.0, 1.0]] * 2 + [[0.1, 0.3, 5.0, 9.0]] * 4 + [[6.0, 0.2, 0.4, 0.05]] * 4
    schedule += [[1.0, 8.0, 0.5, 3.0]] * 6
    s = torch.tensor(schedule, dtype=F64) * (1 + 0.05 * torch.rand(len(schedule), n, generator=gen, dtype=F64))
    grads = [u @ torch.diag(sk) @ vv.T for sk in s]
    w0 = randn(gen, n, n)
    # eps 1e-4 keeps the round-off entries of the rotated gradient (~1e-16) from producing visible m/(sqrt(v)+eps)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.8, 1e-4, 0.01
    hp = make_soap_hyper(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, precondition_frequency=2)

    st = SoapState()
    w = w0
    orders = set()
    expected_w = w0.clone()
    m = torch.zeros(n, dtype=F64)
    v = torch.zeros(n, dtype=F64)
    for k, g in enumerate(grads):
        w = soap_update(w, g, st, hp)
        # the bases are signed permutations of U and V with the same order on both sides
        p_l = (u.T @ st.Q_L).abs()
        p_r = (vv.T @ st.Q_R).abs()
        assert torch.allclose(p_l, p_l.round(), atol=1e-8) and torch.allclose(p_l, p_r, atol=1e-8)
        orders.add(tuple(p_l.argmax(0).tolist()))
        if k > 0:
            m = b1 * m + (1 - b1) * s[k]
            v = b2 * v + (1 - b2) * s[k] ** 2
            step = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
            expected_w = expected_w - step * (u @ torch.diag(m / (v.sqrt() + eps)) @ vv.T)
            expected_w = expected_w - lr * wd * expected_w
        assert torch.allclose(w, expected_w, rtol=1e-9, atol=1e-10), k
    assert len(orders) >= 3, f"the schedule should reorder the basis several times, saw {orders}"


def _signed_permutation(state: SoapState, gen: torch.Generator) -> SoapState:
    """Same basis with permuted, sign-flipped columns; m and v re-expressed consistently."""
    st = copy.deepcopy(state)
    rows, cols = st.m.shape
    p_l = torch.randperm(rows, generator=gen)
    p_r = torch.randperm(cols, generator=gen)
    s_l = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    s_r = torch.where(torch.rand(cols, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    st.Q_L = st.Q_L[:, p_l] * s_l
    st.Q_R = st.Q_R[:, p_r] * s_r
    st.m = st.m[p_l][:, p_r] * s_l[:, None] * s_r[None, :]
    st.v = st.v[p_l][:, p_r]
    return st


def test_soap_signed_permutation_of_basis_leaves_trajectory_unchanged():
    # spec §12.3; the later calls include refreshes (f = 3)
    params, grads = problem([(5, 4)], calls=14, seed=8)
    hp = make_soap_hyper(lr=0.01, precondition_frequency=3)
    st = SoapState()
    w = params[0]
    for call in grads[:5]:  # t = 4 afterwards, one refresh done
        w = soap_update(w, call[0], st, hp)
    twin = _signed_permutation(st, torch.Generator().manual_seed(9))
    assert not torch.allclose(twin.Q_L, st.Q_L)
    w_twin = w.clone()
    for call in grads[5:]:
        w = soap_update(w, call[0], st, hp)
        w_twin = soap_update(w_twin, call[0], twin, hp)
        assert torch.allclose(w, w_twin, rtol=1e-10, atol=1e-12)


def test_soap_transpose_symmetry():
    # running on W^T with G^T swaps the roles of L and R (and of the axes along which v is permuted)
    params, grads = problem([(5, 5), (3, 3)], calls=16, seed=10)
    kw = dict(lr=0.01, betas=(0.9, 0.9), precondition_frequency=3, weight_decay=0.01)
    hist = soap_reference(params, grads, **kw)
    hist_t = soap_reference([p.T.contiguous() for p in params],
                            [[g.T.contiguous() for g in call] for call in grads], **kw)
    for k in range(len(grads)):
        for a, b in zip(hist[k], hist_t[k]):
            assert torch.allclose(a, b.T, rtol=1e-9, atol=1e-10), k


def test_soap_bases_orthonormal_and_factors_psd():
    params, grads = problem([(6, 4), (3, 5), (8, 8), (2, 30)], calls=25, seed=11)
    hp = make_soap_hyper(precondition_frequency=3, max_precond_dim=20)
    states = [SoapState() for _ in params]
    ws = list(params)
    for call in grads:
        ws = [soap_update(w, g, s, hp) for w, g, s in zip(ws, call, states)]
        for s in states:
            for q in (s.Q_L, s.Q_R):
                if q is not None:
                    assert_orthonormal(q)
            for x in (s.L, s.R):
                if x is not None:
                    assert torch.equal(x, x.T) or torch.allclose(x, x.T, atol=1e-14)
                    assert torch.linalg.eigvalsh(x).min() > -1e-12
    assert states[3].Q_R is None and states[3].Q_L is not None
    assert all(torch.isfinite(w).all() for w in ws)


# ----------------------------------------------------------------------------------------------------------
# Shampoo reference


def _torch_history(params, grads, opt_cls, **kw):
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = opt_cls(ps, foreach=False, **kw)
    hist = []
    for call in grads:
        for p, g in zip(ps, call):
            p.grad = g.clone()
        opt.step()
        hist.append([p.detach().clone() for p in ps])
    return hist


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.95, 0.95)])
def test_shampoo_before_first_refresh_equals_torch_adam(betas):
    params, grads = problem([(5, 3), (4,), (6, 6)], calls=12, seed=20)
    hist = shampoo_reference(params, grads, lr=0.01, betas=betas, graft_eps=1e-7, precondition_frequency=100)
    expected = _torch_history(params, grads, torch.optim.Adam, lr=0.01, betas=betas, eps=1e-7)
    for k in range(len(grads)):
        for a, b in zip(hist[k], expected[k]):
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)


def test_shampoo_before_first_refresh_with_decay_equals_torch_adamw():
    params, grads = problem([(5, 3), (4,)], calls=10, seed=21)
    hist = shampoo_reference(params, grads, lr=0.01, weight_decay=0.1, precondition_frequency=11)
    expected = _torch_history(params, grads, torch.optim.AdamW, lr=0.01, weight_decay=0.1, eps=1e-8)
    for k in range(len(grads)):
        for a, b in zip(hist[k], expected[k]):
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)


def test_shampoo_graft_betas_are_used_for_the_grafting_moment():
    params, grads = problem([(4, 3)], calls=5, seed=22)
    hist = shampoo_reference(params, grads, lr=0.01, betas=(0.9, 0.999), graft_betas=(0.9, 0.9),
                             precondition_frequency=50)
    expected = _torch_history(params, grads, torch.optim.Adam, lr=0.01, betas=(0.9, 0.9), eps=1e-8)
    for a, b in zip(hist[-1], expected[-1]):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("exponent", [-0.25, -0.5])
def test_shampoo_first_step_with_f1_closed_form(exponent):
    # t = 1, f = 1: L = (1-rho) U S^2 U^T, R = (1-rho) V S^2 V^T, m_hat = G, so P is proportional to
    # U S^{1+4*exponent} V^T (exponent -1/4: the polar factor U V^T), rescaled to the norm of A = G/(|G|+eps_g).
    gen = torch.Generator().manual_seed(23)
    n = 5
    u, v = random_orthogonal(gen, n), random_orthogonal(gen, n)
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=F64)
    g = u @ torch.diag(s) @ v.T
    w0 = randn(gen, n, n)
    lr = 0.1
    hist = shampoo_reference([w0], [[g]], lr=lr, precondition_frequency=1, exponent=exponent, eps=1e-30)
    a = g / (g.abs() + 1e-8)
    direction = u @ torch.diag(s ** (1 + 4 * exponent)) @ v.T
    expected = w0 - lr * direction * (a.norm() / direction.norm())
    assert torch.allclose(hist[0][0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, max_dim", [((5, 3), 10000), ((3, 20), 5), ((20, 3), 5), ((6,), 10000), ((4, 4), 0)])
def test_shampoo_preconditioner_is_frozen_between_refreshes(shape, max_dim):
    # f = 4: the roots used at calls 4..7 come from the factors after call 4, those at 8..9 from call 8.
    f, calls = 4, 10
    # eps comparable to the factor eigenvalues, so its placement inside the root (and the (1-rho) scale) matter
    lr, b1, b2, rho, eps, geps, gb2 = 0.01, 0.9, 0.99, 0.95, 0.05, 1e-8, 0.9
    params, grads = problem([shape], calls=calls, seed=24)
    gs = [call[0] for call in grads]
    hist = shampoo_reference(params, grads, lr=lr, betas=(b1, b2), factor_beta=rho, eps=eps, graft_eps=geps,
                             graft_betas=(0.5, gb2), precondition_frequency=f, max_precond_dim=max_dim)
    two_d = len(shape) == 2
    rows = shape[0]
    cols = shape[1] if two_d else 1

    def root(x):
        lam, q = torch.linalg.eigh(x)
        return q @ torch.diag((lam.clamp(min=0) + eps) ** -0.25) @ q.T

    def factors_after(t):  # EMA started at zero, over calls 1..t
        gm = [g.reshape(rows, cols) for g in gs[:t]]
        left = sum((1 - rho) * rho ** (t - 1 - j) * gm[j] @ gm[j].T for j in range(t))
        right = sum((1 - rho) * rho ** (t - 1 - j) * gm[j].T @ gm[j] for j in range(t))
        left_root = root(left) if two_d and rows <= max_dim else torch.eye(rows, dtype=F64)
        right_root = root(right) if two_d and cols <= max_dim else torch.eye(cols, dtype=F64)
        return left_root, right_root

    w = params[0].reshape(rows, cols).clone()
    m = torch.zeros(rows, cols, dtype=F64)
    vg = torch.zeros(rows, cols, dtype=F64)
    for t in range(1, calls + 1):
        g = gs[t - 1].reshape(rows, cols)
        m = b1 * m + (1 - b1) * g
        vg = gb2 * vg + (1 - gb2) * g**2
        m_hat = m / (1 - b1**t)
        a = m_hat / ((vg / (1 - gb2**t)).sqrt() + geps)
        if t < f:
            d = a
        else:
            left_root, right_root = factors_after(f * (t // f))
            p = left_root @ m_hat @ right_root
            d = p * a.norm() / p.norm()
            assert (hist[t - 1][0] - hist[t - 2][0]).norm().item() == pytest.approx(lr * a.norm().item(), rel=1e-10)
        w = w - lr * d
        assert torch.allclose(hist[t - 1][0].reshape(rows, cols), w, rtol=1e-9, atol=1e-11), t


def test_shampoo_state_frozen_and_orthonormal():
    params, grads = problem([(6, 4)], calls=9, seed=25)
    hp = make_shampoo_hyper(precondition_frequency=3)
    st = ShampooState()
    w = params[0]
    snapshot = None
    for t, call in enumerate(grads, start=1):
        w = shampoo_update(w, call[0], st, hp)
        assert st.t == t
        if t < 3:
            assert not st.has_basis and st.Q_L is None
            continue
        assert_orthonormal(st.Q_L)
        assert_orthonormal(st.Q_R)
        assert st.lam_L.min() >= 0 and st.lam_R.min() >= 0
        if t % 3 == 0:
            assert snapshot is None or not torch.allclose(snapshot, st.Q_L)
            snapshot = st.Q_L.clone()
        else:
            assert torch.equal(st.Q_L, snapshot)


def test_shampoo_transpose_symmetry():
    params, grads = problem([(5, 3), (4, 4)], calls=12, seed=26)
    kw = dict(lr=0.01, precondition_frequency=3, weight_decay=0.01)
    hist = shampoo_reference(params, grads, **kw)
    hist_t = shampoo_reference([p.T.contiguous() for p in params],
                               [[g.T.contiguous() for g in call] for call in grads], **kw)
    for k in range(len(grads)):
        for a, b in zip(hist[k], hist_t[k]):
            assert torch.allclose(a, b.T, rtol=1e-9, atol=1e-11), k


def test_references_return_float64_clones():
    params = [torch.ones(3, 2, dtype=torch.float32), torch.ones(4, dtype=torch.float32)]
    grads = [[torch.full((3, 2), 0.5), torch.full((4,), -1.0)] for _ in range(3)]
    for ref in (soap_reference, shampoo_reference):
        hist = ref(params, grads)
        assert len(hist) == 3 and all(len(h) == 2 for h in hist)
        assert all(x.dtype == F64 for h in hist for x in h)
        assert hist[0][0] is not hist[1][0]
        assert hist[0][0].shape == (3, 2) and hist[0][1].shape == (4,)
        assert torch.equal(params[0], torch.ones(3, 2))  # inputs are not modified
