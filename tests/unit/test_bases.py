"""kronopt.bases: identity, eigh and SOAP's QR refresh, and the failure policy."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kronopt import linalg
from kronopt.bases import EighBasis, IdentityBasis, QrBasis
from kronopt.types import Layout, StepContext
from tests.assertions import (
    assert_descending,
    assert_is_permutation,
    assert_nearly_diagonal,
    assert_orthonormal,
)
from tests.strategies import SEEDS, dims, generator, orthonormal, randn, spd_from, spd_matrix

F64 = torch.float64
CPU = torch.device("cpu")


def _ctx(layout, state, step=1):
    return StepContext(step=step, layout=layout, basis=state)


def _layout(b, m, n, left="full", right="full"):
    return Layout(batch=b, m=m, n=n, left=left, right=right)


def _factors(gen, b, m, n, dtype=F64, log10_range=(-3.0, 3.0)):
    return (
        spd_matrix(gen, b, m, log10_range=log10_range, dtype=dtype),
        spd_matrix(gen, b, n, log10_range=log10_range, dtype=dtype),
    )


def _assert_same_basis_state(a, b):
    """Two basis states with the same bases, estimates and failure counts, bit for bit."""
    for name in ("Q_L", "Q_R", "lam_L", "lam_R", "failures"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _assert_same_columns_up_to_sign(Q, expected, atol=1e-10):
    """Equal column by column up to each column's sign (a QR routine may flip signs)."""
    signs = torch.sign((Q * expected).sum(dim=-2, keepdim=True))
    assert (signs != 0).all()
    torch.testing.assert_close(Q, expected * signs, rtol=0, atol=atol)


# -- identity -------------------------------------------------------------------------------


@given(seed=SEEDS, m=dims(), n=dims())
def test_identity_basis_is_exact_noop(seed, m, n):
    layout = _layout(2, m, n)
    basis = IdentityBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    assert state.Q_L is None and state.Q_R is None and state.ready
    assert torch.equal(state.failures, torch.zeros(2, dtype=torch.int64))
    new, change = basis.refresh(state, _factors(generator(seed), 2, m, n), _ctx(layout, state))
    assert new is state
    assert change.old is state and change.new is state
    assert change.perm_L is None and change.perm_R is None
    X = randn(generator(seed), 2, m, n)
    assert torch.equal(linalg.rotate(X, new.Q_L, new.Q_R), X)
    assert torch.equal(linalg.unrotate(X, new.Q_L, new.Q_R), X)


# -- eigh -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [EighBasis, QrBasis])
def test_fresh_state_is_identity_and_not_ready(cls):
    layout = _layout(2, 3, 4, "full", "none")
    state = cls().init(layout, dtype=F64, device=CPU)
    assert not state.ready and state.refreshes == 0
    assert torch.equal(state.Q_L, torch.eye(3, dtype=F64).expand(2, 3, 3))
    assert state.Q_R is None and state.lam_R is None
    assert state.lam_L.shape == (2, 3)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3))
def test_eigh_basis_orthonormal_and_diagonalises_factors(seed, m, n, b):
    layout = _layout(b, m, n)
    basis = EighBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    L, R = _factors(generator(seed), b, m, n)
    new, change = basis.refresh(state, (L, R), _ctx(layout, state))
    assert new.ready and new.refreshes == 1
    assert change.old is state and change.new is new
    assert change.perm_L is None and change.perm_R is None
    for X, Q, lam in ((L, new.Q_L, new.lam_L), (R, new.Q_R, new.lam_R)):
        d = X.shape[-1]
        assert Q.shape == X.shape and lam.shape == X.shape[:-1]
        assert_orthonormal(Q, atol=1e-12 * d)
        D = Q.mT @ X @ Q
        assert_nearly_diagonal(D, rtol=1e-11)
        assert_descending(lam)
        torch.testing.assert_close(torch.diagonal(D, dim1=-2, dim2=-1), lam, rtol=1e-9, atol=1e-12 * lam[..., :1].abs().max().item())
    assert torch.equal(new.failures, torch.zeros(b, dtype=torch.int64))


def test_eigh_basis_float32_orthonormal():
    layout = _layout(2, 8, 5)
    basis = EighBasis()
    state = basis.init(layout, dtype=torch.float32, device=CPU)
    L, R = _factors(generator(11), 2, 8, 5, dtype=torch.float32, log10_range=(-2.0, 2.0))
    new, _ = basis.refresh(state, (L, R), _ctx(layout, state))
    assert new.Q_L.dtype == torch.float32
    assert_orthonormal(new.Q_L, atol=1e-5)  # soap.md §12.7
    assert_orthonormal(new.Q_R, atol=1e-5)
    assert_nearly_diagonal(new.Q_L.mT @ L @ new.Q_L, rtol=1e-5)


def test_eigh_basis_missing_factor_raises():
    layout = _layout(1, 3, 3)
    basis = EighBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    with pytest.raises(ValueError, match="needs a left factor"):
        basis.refresh(state, (None, torch.eye(3, dtype=F64)[None]), _ctx(layout, state))


# -- qr ---------------------------------------------------------------------------------------


@given(seed=SEEDS, m=dims(), n=dims())
def test_qr_first_refresh_equals_eigh(seed, m, n):
    layout = _layout(2, m, n)
    factors = _factors(generator(seed), 2, m, n)
    s_qr = QrBasis().init(layout, dtype=F64, device=CPU)
    s_eig = EighBasis().init(layout, dtype=F64, device=CPU)
    a, _ = QrBasis().refresh(s_qr, factors, _ctx(layout, s_qr))
    e, _ = EighBasis().refresh(s_eig, factors, _ctx(layout, s_eig))
    for x, y in ((a.Q_L, e.Q_L), (a.Q_R, e.Q_R), (a.lam_L, e.lam_L), (a.lam_R, e.lam_R)):
        assert torch.equal(x, y)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), steps=st.integers(1, 3))
def test_qr_refresh_permutation_and_rayleigh_sorting(seed, m, n, b, steps):
    gen = generator(seed)
    layout = _layout(b, m, n)
    basis = QrBasis(power_steps=steps)
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, _factors(gen, b, m, n), _ctx(layout, state))
    L, R = _factors(gen, b, m, n)
    new, change = basis.refresh(state, (L, R), _ctx(layout, state, step=2))
    assert new.refreshes == 2 and change.old is state and change.new is new
    for X, Q_old, Q_new, lam, perm in (
        (L, state.Q_L, new.Q_L, new.lam_L, change.perm_L),
        (R, state.Q_R, new.Q_R, new.lam_R, change.perm_R),
    ):
        d = X.shape[-1]
        assert perm.shape == (b, d) and perm.dtype == torch.int64
        assert_is_permutation(perm)
        # independent of linalg's helpers: Rayleigh quotients as diag(Qᵀ X Q), sorted descending by torch,
        # columns gathered by fancy indexing, then `steps` plain QR power steps
        rayleigh = torch.diagonal(Q_old.mT @ X @ Q_old, dim1=-2, dim2=-1)
        order = torch.sort(rayleigh, dim=-1, descending=True).indices
        torch.testing.assert_close(rayleigh.gather(-1, perm), rayleigh.gather(-1, order), rtol=0, atol=0)
        Q_sorted = torch.stack([Q_old[i][:, perm[i]] for i in range(b)])
        torch.testing.assert_close(lam, torch.diagonal(Q_sorted.mT @ X @ Q_sorted, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
        assert_descending(lam)
        assert_orthonormal(Q_new, atol=1e-11 * d)
        expected = Q_sorted
        for _ in range(steps):
            expected = torch.linalg.qr(X @ expected).Q
        _assert_same_columns_up_to_sign(Q_new, expected, atol=1e-7)  # (A Q)[:, π] is reused: rounding, amplified by the QR of ill-conditioned powers
    assert torch.equal(new.failures, torch.zeros(b, dtype=torch.int64))


def _after_first_refresh(basis, gen, b, m, n):
    """``(layout, state)`` of ``basis`` after its first refresh (eigh) on random factors."""
    layout = _layout(b, m, n)
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, _factors(gen, b, m, n), _ctx(layout, state))
    return layout, state


def test_qr_refresh_without_sort_reports_no_permutation():
    gen = generator(5)
    basis = QrBasis(sort=False)
    layout, state = _after_first_refresh(basis, gen, 2, 4, 3)
    L, R = _factors(gen, 2, 4, 3)
    new, change = basis.refresh(state, (L, R), _ctx(layout, state))
    assert change.perm_L is None and change.perm_R is None
    # columns stay in place: one QR power step of the old basis, Rayleigh quotients of the old columns
    _assert_same_columns_up_to_sign(new.Q_L, torch.linalg.qr(L @ state.Q_L).Q)
    _assert_same_columns_up_to_sign(new.Q_R, torch.linalg.qr(R @ state.Q_R).Q)
    torch.testing.assert_close(new.lam_L, torch.diagonal(state.Q_L.mT @ L @ state.Q_L, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.lam_R, torch.diagonal(state.Q_R.mT @ R @ state.Q_R, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sort", [False, True])
def test_qr_refresh_skips_the_quotients_only_where_nothing_reads_them(sort):
    """``eigvals_from_basis = False`` (the factor estimator tracks its own eigenvalues): without ``sort`` the
    power step skips its Rayleigh quotients and the side keeps its old estimates; the basis is the same
    bit for bit. With ``sort`` the quotients order the columns and are kept as the estimates."""
    gen = generator(9)
    basis = QrBasis(sort=sort)
    layout, state = _after_first_refresh(basis, gen, 2, 5, 4)
    L, R = _factors(gen, 2, 5, 4)
    read, _ = basis.refresh(state, (L, R), _ctx(layout, state))
    unread, change = basis.refresh(state, (L, R), StepContext(step=2, layout=layout, basis=state, eigvals_from_basis=False))
    assert torch.equal(unread.Q_L, read.Q_L) and torch.equal(unread.Q_R, read.Q_R)
    if sort:
        assert torch.equal(unread.lam_L, read.lam_L) and torch.equal(unread.lam_R, read.lam_R)
        assert change.perm_L is not None
    else:
        assert unread.lam_L is state.lam_L and unread.lam_R is state.lam_R
        assert not torch.equal(read.lam_L, state.lam_L)  # the quotients would have changed them
    assert torch.equal(unread.failures, torch.zeros(2, dtype=torch.int64))


def test_qr_refresh_without_quotients_still_keeps_a_non_finite_blocks_basis():
    gen = generator(10)
    basis = QrBasis(sort=False)
    layout, state = _after_first_refresh(basis, gen, 2, 4, 3)
    L, R = _factors(gen, 2, 4, 3)
    L[1, 0, 0] = float("nan")
    new, _ = basis.refresh(state, (L, R), StepContext(step=2, layout=layout, basis=state, eigvals_from_basis=False))
    assert torch.equal(new.Q_L[1], state.Q_L[1]) and not torch.equal(new.Q_L[0], state.Q_L[0])
    assert new.failures.tolist() == [0, 1]


@given(seed=SEEDS, n=dims(2, 8))
def test_qr_refreshes_converge_to_an_eigenbasis(seed, n):
    gen = generator(seed)
    # eigenvalues 10^0, 10^-1, ...: well separated, so subspace iteration converges fast
    lam = 10.0 ** -torch.arange(n, dtype=F64)
    X = spd_from(orthonormal(gen, 1, n), lam[None])
    layout = _layout(1, n, 1, "full", "none")
    basis = QrBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, (spd_matrix(gen, 1, n), None), _ctx(layout, state))  # unrelated start
    for _ in range(40):
        state, _ = basis.refresh(state, (X, None), _ctx(layout, state))
    assert_orthonormal(state.Q_L, atol=1e-12 * n)
    D = state.Q_L.mT @ X @ state.Q_L
    torch.testing.assert_close(torch.diagonal(D, dim1=-2, dim2=-1), lam[None], rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(state.lam_L, lam[None], rtol=1e-8, atol=1e-14)


# -- failure policy ---------------------------------------------------------------------------------


def _always_fail(A):
    raise RuntimeError(f"simulated eigh failure in {A.dtype}")


def test_failed_eigh_keeps_old_basis_and_counts_failure(monkeypatch):
    gen = generator(2)
    layout = _layout(2, 5, 3, "full", "none")
    basis = EighBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, (spd_matrix(gen, 2, 5), None), _ctx(layout, state))  # a real basis
    monkeypatch.setattr(linalg, "_eigh", _always_fail)
    new, change = basis.refresh(state, (spd_matrix(gen, 2, 5), None), _ctx(layout, state))
    assert torch.equal(new.Q_L, state.Q_L)
    assert torch.equal(new.lam_L, state.lam_L)
    assert new.failures.tolist() == [1, 1]
    assert change.perm_L is None
    newer, _ = basis.refresh(new, (spd_matrix(gen, 2, 5), None), _ctx(layout, new))
    assert torch.equal(newer.Q_L, state.Q_L)
    assert newer.failures.tolist() == [2, 2]


def test_qr_failed_first_refresh_keeps_identity_and_counts_failure(monkeypatch):
    layout = _layout(2, 4, 3, "none", "full")
    basis = QrBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    monkeypatch.setattr(linalg, "_eigh", _always_fail)
    new, _ = basis.refresh(state, (None, spd_matrix(generator(3), 2, 3)), _ctx(layout, state))
    assert torch.equal(new.Q_R, state.Q_R)
    assert torch.equal(new.lam_R, state.lam_R)
    assert new.failures.tolist() == [1, 1]


def test_failed_eigh_on_both_sides_counts_at_least_once(monkeypatch):
    gen = generator(4)
    layout = _layout(2, 4, 3)
    basis = EighBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, _factors(gen, 2, 4, 3), _ctx(layout, state))
    monkeypatch.setattr(linalg, "_eigh", _always_fail)
    new, _ = basis.refresh(state, _factors(gen, 2, 4, 3), _ctx(layout, state))
    assert torch.equal(new.Q_L, state.Q_L) and torch.equal(new.Q_R, state.Q_R)
    assert (new.failures >= 1).all()


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eigh_nonfinite_factor_block_keeps_old_basis_for_that_block_only(bad, dtype):
    gen = generator(9)
    b, m, n = 3, 4, 3
    layout = _layout(b, m, n)
    basis = EighBasis()
    state = basis.init(layout, dtype=dtype, device=CPU)
    state, _ = basis.refresh(state, _factors(gen, b, m, n, dtype=dtype, log10_range=(-1.0, 1.0)), _ctx(layout, state))
    L, R = _factors(gen, b, m, n, dtype=dtype, log10_range=(-1.0, 1.0))
    L_bad = L.clone()
    L_bad[1, 0, 1] = L_bad[1, 1, 0] = float(bad)
    new, _ = basis.refresh(state, (L_bad, R), _ctx(layout, state, step=2))
    fresh, _ = basis.refresh(state, (L, R), _ctx(layout, state, step=2))
    assert torch.isfinite(new.Q_L).all() and torch.isfinite(new.lam_L).all()
    assert torch.equal(new.Q_L[1], state.Q_L[1]), "the non-finite block must keep its old basis"
    assert torch.equal(new.lam_L[1], state.lam_L[1])
    for i in (0, 2):
        torch.testing.assert_close(new.Q_L[i], fresh.Q_L[i], msg=f"finite block {i} was not refreshed")
        torch.testing.assert_close(new.lam_L[i], fresh.lam_L[i])
    torch.testing.assert_close(new.Q_R, fresh.Q_R)
    assert new.failures.tolist() == [0, 1, 0]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_qr_nonfinite_factor_block_keeps_old_basis_for_that_block_only(bad):
    gen = generator(10)
    b, m, n = 3, 4, 3
    layout = _layout(b, m, n)
    basis = QrBasis()
    state = basis.init(layout, dtype=F64, device=CPU)
    state, _ = basis.refresh(state, _factors(gen, b, m, n), _ctx(layout, state))
    L, R = _factors(gen, b, m, n)
    L_bad = L.clone()
    L_bad[1, 0, 1] = L_bad[1, 1, 0] = float(bad)
    new, change = basis.refresh(state, (L_bad, R), _ctx(layout, state, step=2))
    fresh, fchange = basis.refresh(state, (L, R), _ctx(layout, state, step=2))
    assert torch.isfinite(new.Q_L).all() and torch.isfinite(new.lam_L).all()
    assert torch.equal(new.Q_L[1], state.Q_L[1])
    assert torch.equal(new.lam_L[1], state.lam_L[1])
    assert torch.equal(change.perm_L[1], torch.arange(m)), "a block that kept its basis must report no permutation"
    for i in (0, 2):
        torch.testing.assert_close(new.Q_L[i], fresh.Q_L[i])
        assert torch.equal(change.perm_L[i], fchange.perm_L[i])
    torch.testing.assert_close(new.Q_R, fresh.Q_R)
    assert new.failures.tolist() == [0, 1, 0]


@pytest.mark.parametrize("basis", [QrBasis(), EighBasis()], ids=["qr", "eigh"])
def test_refreshes_read_on_the_host_count_and_fall_back_as_on_a_device(basis, monkeypatch):
    """A CPU reads each side's verdict on the host and, with every block ok, keeps the new basis, estimates
    and permutation as they are and adds no failure (the count stays the stored tensor itself: nothing to
    write). Against the device-agnostic path (``_CPU_HOST_VERDICTS`` off, as on a GPU), over a clean
    refresh, one with a non-finite block and a clean one again: the same bases, estimates, permutations and
    counts bit for bit."""
    runs = {}
    for host in (True, False):
        monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
        gen = generator(12)
        layout, state = _after_first_refresh(basis, gen, 3, 5, 4)
        seen = []
        for step, bad in ((2, False), (3, True), (4, False)):
            L, R = _factors(gen, 3, 5, 4)
            if bad:
                L[1, 0, 1] = L[1, 1, 0] = float("nan")
            new, change = basis.refresh(state, (L, R), _ctx(layout, state, step=step))
            if host and not bad:
                assert new.failures is state.failures
            seen.append((new, change))
            state = new
        runs[host] = seen
        assert [new.failures.tolist() for new, _ in seen] == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]
    for (a, ca), (b, cb) in zip(runs[True], runs[False]):
        _assert_same_basis_state(a, b)
        for name in ("perm_L", "perm_R"):
            x, y = getattr(ca, name), getattr(cb, name)
            assert (x is None and y is None) or torch.equal(x, y), name


def test_restricted_and_first_refreshes_count_failures_read_on_the_host_as_on_a_device(monkeypatch):
    """The restricted side's refresh (Rayleigh–Ritz and a power step on ``U``) and a first refresh (eigh)
    with a non-finite block: on the host and on the device-agnostic path, the same bases, estimates and
    failure counts, the bad block counted once per refresh in which it failed."""
    runs = {}
    for host in (True, False):
        monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
        gen = generator(3)
        b, m, n, r = 3, 5, 12, 4
        layout = Layout(batch=b, m=m, n=n, left="full", right="restricted", rank_right=r)
        basis = QrBasis()
        state = basis.init(layout, dtype=F64, device=CPU)
        counts, states = [], []
        for step in range(4):
            L, _ = _factors(gen, b, m, n)
            P = torch.randn(b, n, r, generator=gen, dtype=F64)
            if step in (0, 2):  # the first refresh (eigh on the full side) and a later one
                P[1, 0, 0] = float("nan")
                L[2, 0, 0] = L[2, 0, 0] * float("inf")
            state, _ = basis.refresh(state, (L, P), StepContext(step=step + 1, layout=layout, basis=state))
            counts.append(state.failures.tolist())
            states.append(state)
        runs[host] = states
        assert counts == [[0, 1, 1], [0, 1, 1], [0, 2, 2], [0, 2, 2]]
    for a, c in zip(runs[True], runs[False]):
        _assert_same_basis_state(a, c)


@pytest.mark.parametrize("preset, from_basis", [("soap", True), ("kl_shampoo", False), ("pro_kl_shampoo", False)])
def test_the_context_says_whose_eigenvalues_the_stages_read(preset, from_basis):
    """``compose.context`` marks the basis's estimates as unread where the factor estimator tracks its own;
    the KL presets' unsorted QR refreshes then leave a full side's estimates as the first (eigh) refresh
    set them, where soap's sorted ones move them."""
    import kronopt

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 8, generator=gen, dtype=F64))]
    opt = kronopt.build([("w", params[0])], preset, **{"refresh.every": 2, "state_dtype": "float64"})
    bucket = opt._buckets[0]
    full = [side for side, kind in (("lam_L", bucket.layout.left), ("lam_R", bucket.layout.right)) if kind == "full"]
    assert full  # pro_kl_shampoo restricts the larger side only
    history = []
    for _ in range(7):
        params[0].grad = torch.randn(12, 8, generator=gen, dtype=F64)
        opt.step()
        basis = opt._buckets[0].state.basis
        if basis.ready:
            history.append([getattr(basis, side).clone() for side in full])
    bucket = opt._buckets[0]
    ctx = kronopt.compose.context(opt._bucket_config(bucket), bucket.layout, bucket.state, bucket.state.step)
    assert ctx.eigvals_from_basis is from_basis
    assert bucket.state.basis.refreshes >= 3
    unchanged = all(torch.equal(a, b) for lams in history for a, b in zip(lams, history[0]))
    assert unchanged is not from_basis
