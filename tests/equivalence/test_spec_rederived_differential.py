"""A second, independent reading of the specs: kronopt's presets against float64 references written here.

The references below were written from ``shared/specs/{soap,muon,dykaf,kl_shampoo,pro_kl_shampoo}.md`` (and the
preset hyperparameters of ``kronopt/presets.py``) only: not from ``tests/reference/*.py`` nor from kronopt's code.
Each is compared step for step (float64 parameters, so float64 state, ``rtol``-like bound 1e-9 of max|W|) over
20-32 calls with several refreshes, on shapes where spec details matter: square, tall, wide, 1 x n, n x 1, 1-D,
a side above ``shapes.max_dim`` (left unrotated), 3-D and 4-D (conv) weights flattened to (o, prod(rest)), runs of
zero gradients and gradients whose scale jumps by 10-100x between steps.

What the spec leaves to round-off is adopted from the implementation after a check (``check_and_adopt``): the
null-space completion of a rank-deficient first factor (soap.md §8, dykaf.md §5: the first eigh basis of a rank-1
kron start) and the completion of a rank-deficient first subspace (pro_kl_shampoo.md §6, "a fixed orthonormal
set"). Everything after that is computed here.

Where kronopt documents a deviation from a spec (Pro-KLShampoo's subspace refresh order, docs/kl.md; DyKAF's
zero-first-gradient start, docs/dykaf.md "Known limitation") the test pins the documented variant exactly and
bounds, or xfails, the spec reading.
"""

import math

import pytest
import torch

import kronopt

D = torch.float64


# ----------------------------------------------------------------------------------------- helpers
def eigh_desc(X):
    """soap.md §5.2: eigenvectors, columns reversed so eigenvalues descend."""
    w, V = torch.linalg.eigh(X)
    return w.flip(-1), V.flip(-1)


def qr_q(X):
    return torch.linalg.qr(X)[0]


def block_shape(shape):
    """soap.md §7 / DESIGN.md: 1-D (d,) -> (d, 1); conv (o, i, kh, kw) -> (o, i*kh*kw)."""
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def check_and_adopt(Q_ours, X, Q_theirs, tol=1e-8):
    """The spec leaves the null-space completion of a rank-deficient first factor to round-off (soap.md §8,
    dykaf.md §5): accept the implementation's basis iff it is an orthonormal eigenbasis of OUR factor X with
    descending eigenvalues; otherwise keep ours (and the comparison will fail loudly)."""
    Q = Q_theirs.detach().to(D).clone()
    k = Q.shape[-1]
    eye = torch.eye(k, dtype=D)
    if torch.linalg.matrix_norm(Q.mT @ Q - eye) > tol:
        return Q_ours
    H = Q.mT @ X @ Q
    scale = max(1.0, float(torch.linalg.matrix_norm(X)))
    off = H - torch.diag(torch.diagonal(H))
    d = torch.diagonal(H)
    if float(torch.linalg.matrix_norm(off)) > tol * scale or bool((d[1:] > d[:-1] + tol * scale).any()):
        return Q_ours
    return Q


# ----------------------------------------------------------------------------------------- SOAP
class SoapRef:
    """soap.md §4-§7 for one parameter (2-D block; 1-D with precondition_1d False: both sides none)."""

    def __init__(self, shape, *, lr, betas, rho, eps, wd, f, max_dim, correct_bias=True, normalize=False,
                 precondition_1d=False, block=None, rank1=False):
        self.rank1 = rank1
        self.shape = tuple(shape)
        self.m, self.n = block_shape(self.shape) if block is None else block
        self.normalize = normalize
        if len(self.shape) == 1:
            # §7: precondition_1d False -> both sides none; True and d <= max -> one d x d factor, trivial right side
            self.full = (precondition_1d and self.m <= max_dim, False)
        else:
            self.full = (self.m <= max_dim, self.n <= max_dim)  # §3 max_precond_dim: factor iff d <= max
        self.lr, self.b1, self.b2, self.rho, self.eps, self.wd, self.f = lr, betas[0], betas[1], rho, eps, wd, f
        self.correct_bias = correct_bias
        self.calls = 0
        self.t = 0
        self.L = self.R = self.QL = self.QR = None

    # rotate(X) = Q_L^T X Q_R, identity on a none side (§4)
    def rot(self, X):
        if self.full[0]:
            X = self.QL.mT @ X
        if self.full[1]:
            X = X @ self.QR
        return X

    def unrot(self, X):
        if self.full[0]:
            X = self.QL @ X
        if self.full[1]:
            X = X @ self.QR.mT
        return X

    def factor_init(self, G):
        if self.full[0]:
            self.L = (1 - self.rho) * G @ G.mT
        if self.full[1]:
            self.R = (1 - self.rho) * G.mT @ G

    def factor_update(self, G):
        # §6.7
        if self.full[0]:
            self.L = self.rho * self.L + (1 - self.rho) * G @ G.mT
        if self.full[1]:
            self.R = self.rho * self.R + (1 - self.rho) * G.mT @ G

    def first_basis(self, adopt=None):
        if self.full[0]:
            QL = eigh_desc(self.L)[1]
            self.QL = QL if adopt is None else check_and_adopt(QL, self.L, adopt[0])
        if self.full[1]:
            QR = eigh_desc(self.R)[1]
            self.QR = QR if adopt is None else check_and_adopt(QR, self.R, adopt[1])

    def step(self, W, G, adopt=None):
        """W, G in the parameter's shape (float64). Returns the new W. ``adopt``: (Q_L, Q_R) from the
        implementation, used only on the first call, only if they diagonalise our factors."""
        W = W.reshape(self.m, self.n).clone()
        G = G.reshape(self.m, self.n).to(D)
        self.calls += 1
        if self.calls == 1:  # §5
            self.factor_init(G)
            self.first_basis(adopt)
            self.mom = torch.zeros(self.m, self.n, dtype=D)
            self.v = torch.zeros(self.m, self.n, dtype=D)
            self.l = torch.full((self.m,), 1e-8, dtype=D)  # dykaf.md §7 start
            self.r = torch.full((self.n,), 1e-8, dtype=D)
            return W.reshape(self.shape)
        # §6
        self.t += 1
        Gr = self.rot(G)
        self.mom = self.b1 * self.mom + (1 - self.b1) * Gr
        if self.rank1:  # dykaf.md §7: parallel rank-1 integrator on V <- b2 V + (1-b2) D
            Dm = Gr * Gr
            a, b = self.l.norm(), self.r.norm()
            lb, rb, S0 = self.l / a, self.r / b, a * b
            l1 = self.b2 * S0 * lb + (1 - self.b2) * Dm @ rb
            l1 = l1 / l1.norm()
            r1 = self.b2 * S0 * rb + (1 - self.b2) * Dm.mT @ lb
            r1 = r1 / r1.norm()
            c = self.b2 * S0 * (l1 @ lb) * (r1 @ rb) + (1 - self.b2) * l1 @ Dm @ r1
            self.l, self.r = c.sqrt() * l1, c.sqrt() * r1
            self.v = torch.outer(self.l, self.r)
        else:
            self.v = self.b2 * self.v + (1 - self.b2) * Gr * Gr
        N = self.unrot(self.mom / (self.v.sqrt() + self.eps))
        if self.normalize:  # §6.4
            N = N / (1e-30 + N.square().mean().sqrt())
        eta = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t) if self.correct_bias else self.lr
        W = W - eta * N
        if self.wd:
            W = W - self.lr * self.wd * W
        self.factor_update(G)
        if self.t % self.f == 0:
            self.refresh()
        return W.reshape(self.shape)

    def refresh(self):
        # §6.8-9: Rayleigh quotients of the updated factor in the old basis, sort desc, permute v, QR power step;
        # m follows: unrotate with the old basis, rotate with the new one.
        M_orig = self.unrot(self.mom)
        if self.full[0]:
            e = torch.diagonal(self.QL.mT @ self.L @ self.QL)
            pi = torch.argsort(e, descending=True)
            self.v = self.v[pi, :]
            self.l = self.l[pi]
            self.QL = qr_q(self.L @ self.QL[:, pi])
        if self.full[1]:
            e = torch.diagonal(self.QR.mT @ self.R @ self.QR)
            pi = torch.argsort(e, descending=True)
            self.v = self.v[:, pi]
            self.r = self.r[pi]
            self.QR = qr_q(self.R @ self.QR[:, pi])
        self.mom = self.rot(M_orig)


# ----------------------------------------------------------------------------------------- DyKAF
def proj_split_ksl(L, R, G, beta):
    """dykaf.md §3 pseudo code, literally."""
    L = math.sqrt(beta) * L
    R = math.sqrt(beta) * R
    G = math.sqrt(1 - beta) * G
    r = torch.linalg.matrix_norm(R)
    Rb = R / r
    C = G @ Rb @ G.mT
    K = r * L + C
    S_hat = torch.linalg.matrix_norm(K)
    U = K / S_hat
    S_t = r * (U * L).sum()
    R_hat = S_t * Rb + G.mT @ U @ G
    S = torch.linalg.matrix_norm(R_hat)
    return math.sqrt(S) * U, R_hat / math.sqrt(S)


def proj_split_parallel(L, R, G, beta):
    """dykaf.md §4 pseudo code, literally."""
    L = math.sqrt(beta) * L
    R = math.sqrt(beta) * R
    G = math.sqrt(1 - beta) * G
    l, r = torch.linalg.matrix_norm(L), torch.linalg.matrix_norm(R)
    S0 = l * r
    Lb, Rb = L / l, R / r
    U = S0 * Lb + G @ Rb @ G.mT
    U = U / torch.linalg.matrix_norm(U)
    V = S0 * Rb + G.mT @ Lb @ G
    V = V / torch.linalg.matrix_norm(V)
    S1 = S0 * (Lb * U).sum() * (Rb * V).sum() + (U * (G @ V @ G.mT)).sum()
    return math.sqrt(S1) * U, math.sqrt(S1) * V


class DykafRef(SoapRef):
    """dykaf.md §5-§8: SOAP whose two-sided factors follow KSL from the EMA-consistent kron start.

    ``feed_first_twice``: dykaf.md §6 literally says "First call: (L, R) <- init(G); (L, R) <- proj_split(L, R, G)",
    while §5 says the default kron start is *not* fed through the integrator a second time. Both readings are
    available; §5 is the more specific statement about the default.
    """

    def __init__(self, *a, feed_first_twice=False, init="kron", variant="ksl", one_sided="ema", **k):
        super().__init__(*a, **k)
        self.one_sided = one_sided
        self.feed_first_twice = feed_first_twice
        self.init = init
        self.integrator = proj_split_ksl if variant == "ksl" else proj_split_parallel
        self.two_sided = all(self.full)
        self.initialised = False

    def factor_init(self, G):
        if not self.two_sided:  # §8: one side none -> SOAP EMA on the other side, no kron init
            if self.one_sided == "sum":  # §8 option: undecayed sum from 1e-3 I/||I||_F
                for side, d in ((0, self.m), (1, self.n)):
                    if self.full[side]:
                        X = 1e-3 * torch.eye(d, dtype=D) / math.sqrt(d) + (G @ G.mT if side == 0 else G.mT @ G)
                        setattr(self, "LR"[side], X)
                return None
            return super().factor_init(G)
        m, n = G.shape
        if self.init in ("kron", "kron_reference"):
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            u, v, s1 = U[:, 0], Vh[0, :], S[0]
            # §5: kron -> sqrt(1-beta)*sigma1 per factor, not fed again; kron_reference -> sqrt(sigma1), fed once more
            c = math.sqrt(1 - self.rho) * s1 if self.init == "kron" else math.sqrt(s1)
            self.L = c * torch.outer(u, u)
            self.R = c * torch.outer(v, v)
            fed = self.feed_first_twice or self.init == "kron_reference"
        elif self.init == "eps":
            self.L = 1e-3 * torch.eye(m, dtype=D) / math.sqrt(m)
            self.R = 1e-3 * torch.eye(n, dtype=D) / math.sqrt(n)
            fed = True  # §6 "First call: (L, R) <- init(G); (L, R) <- proj_split(L, R, G)"
        else:  # sum
            self.L = G @ G.mT
            self.R = G.mT @ G
            fed = True
        if fed:
            self.L, self.R = self.integrator(self.L, self.R, G, self.rho)

    def factor_update(self, G):
        if not self.two_sided:
            if self.one_sided == "sum":
                if self.full[0]:
                    self.L = self.L + G @ G.mT
                if self.full[1]:
                    self.R = self.R + G.mT @ G
                return None
            return super().factor_update(G)
        self.L, self.R = self.integrator(self.L, self.R, G, self.rho)

    def step(self, W, G, adopt=None):
        # §5: a block whose first gradient is exactly zero stays uninitialised (no state, no update, no count)
        if self.two_sided and self.calls == 0 and not bool(G.ne(0).any()):
            return W.clone()
        return super().step(W, G, adopt)


# ----------------------------------------------------------------------------------------- Muon
KJ = (3.4445, -4.7750, 2.0315)


#: muon.md §4, transcribed from the spec table: (tuples, beyond-the-list rule)
NS_SCHEDULES = {
    "kj": ((KJ,), "repeat_last"),
    "polar_express": (
        ((8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
         (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
         (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750)),
        "repeat_last",
    ),
    "quintic": (
        ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
         (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
        "cycle",
    ),
    "cans": (
        ((8.4703, -25.1081, 18.6293), (4.1828, -3.1087, 0.5806), (3.9619, -2.9541, 0.5630),
         (3.2866, -2.4647, 0.5074), (2.2737, -1.6447, 0.4162)),
        "repeat_last",
    ),
    "deepseekv4": ((KJ,) * 8 + ((2.0, -1.5, 0.5),) * 2, "repeat_last"),
}


def schedule(name, steps):
    tuples, beyond = NS_SCHEDULES[name]
    if beyond == "cycle":
        return tuple(tuples[k % len(tuples)] for k in range(steps))
    return tuple(tuples[min(k, len(tuples) - 1)] for k in range(steps))


def newton_schulz(U, steps=5, coeffs=(KJ,), eps=1e-7, dtype=D, norm="clamp"):
    """muon.md §3."""
    X = U.to(dtype)
    tr = X.shape[-2] > X.shape[-1]
    if tr:
        X = X.mT
    nrm = torch.linalg.matrix_norm(X, keepdim=True)
    X = X / (nrm.clamp_min(eps) if norm == "clamp" else nrm + eps)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        Y = b * A + c * (A @ A)
        X = a * X + Y @ X
    if tr:
        X = X.mT
    return X


class MuonRef:
    """muon.md §2, EMA momentum form, Nesterov, scale 'original' from the 2-D block (§5)."""

    def __init__(self, shape, *, lr, wd, beta, nesterov=True, ns_dtype=D, coefficients="kj", steps=5,
                 norm="clamp", scale="original", extra_scale=1.0, scale_shape="block", form="ema"):
        self.shape = tuple(shape)
        self.m, self.n = block_shape(self.shape)
        self.lr, self.wd, self.beta, self.nesterov, self.ns_dtype = lr, wd, beta, nesterov, ns_dtype
        self.coeffs, self.steps, self.norm = schedule(coefficients, steps), steps, norm
        self.scale, self.extra_scale, self.scale_shape, self.form = scale, extra_scale, scale_shape, form
        self.B = torch.zeros(self.m, self.n, dtype=D)

    def shape_scale(self):
        """muon.md §5."""
        m, n = (self.m, self.n) if self.scale_shape == "block" else self.shape[-2:]
        return {
            "original": math.sqrt(max(1.0, m / n)),
            "match_rms_adamw": 0.2 * math.sqrt(max(m, n)),
            "spectral": math.sqrt(max(m, n)),
            "unit_rms_norm": math.sqrt(m / n),
            "none": 1.0,
        }[self.scale] * self.extra_scale

    def step(self, W, G):
        W = W.reshape(self.m, self.n).clone()
        G = G.reshape(self.m, self.n).to(D)
        if self.form == "ema":
            self.B = self.beta * self.B + (1 - self.beta) * G
            U = (1 - self.beta) * G + self.beta * self.B if self.nesterov else self.B
        else:  # classic
            self.B = self.beta * self.B + G
            U = G + self.beta * self.B if self.nesterov else self.B
        O = newton_schulz(U, steps=self.steps, coeffs=self.coeffs, dtype=self.ns_dtype, norm=self.norm).to(D)
        W = W * (1 - self.lr * self.wd)
        W = W - self.lr * self.shape_scale() * O
        return W.reshape(self.shape)


# ----------------------------------------------------------------------------------------- KL-Shampoo
class KlRef:
    """kl_shampoo.md §5-§6 (KL-Shampoo, momentum in the original basis) and §8 (a side > max_dim is none, s = 1)."""

    def __init__(self, shape, *, lr, b1, rho, eps, wd, f, init_factor, clamping=True, max_clamp=4000.0,
                 damping=0.0, max_dim=10000, klsoap=False, b2=None, normalize=False):
        self.klsoap, self.b2, self.normalize = klsoap, b2, normalize
        self.shape = tuple(shape)
        self.m, self.n = block_shape(self.shape)
        self.full = (self.m <= max_dim, self.n <= max_dim)
        self.lr, self.b1, self.rho, self.eps, self.wd, self.f = lr, b1, rho, eps, wd, f
        self.init_factor, self.clamping, self.max_clamp, self.kappa = init_factor, clamping, max_clamp, damping
        self.calls = 0
        self.t = 0

    def clamp_c(self, d):
        return max(10.0, min(d, self.max_clamp))

    def step(self, W, G, adopt=None):
        m, n = self.m, self.n
        W = W.reshape(m, n).clone()
        G = G.reshape(m, n).to(D)
        self.calls += 1
        rho = self.rho
        if self.calls == 1:  # §5
            self.QL = torch.eye(m, dtype=D)
            self.QR = torch.eye(n, dtype=D)
            if self.full[0]:
                self.SL = (1 - rho) * G @ G.mT / n
                Q = eigh_desc(self.SL)[1]
                self.QL = Q if adopt is None else check_and_adopt(Q, self.SL, adopt[0])
            if self.full[1]:
                self.SR = (1 - rho) * G.mT @ G / m
                Q = eigh_desc(self.SR)[1]
                self.QR = Q if adopt is None else check_and_adopt(Q, self.SR, adopt[1])
            s0 = self.init_factor**-0.5
            self.sL = torch.full((m,), s0 if self.full[0] else 1.0, dtype=D)
            self.sR = torch.full((n,), s0 if self.full[1] else 1.0, dtype=D)
            self.M = torch.zeros(m, n, dtype=D)
            self.V = torch.zeros(m, n, dtype=D)
            return W.reshape(self.shape)
        self.t += 1
        if self.klsoap:  # §7: Adam in the rotated basis, no bias correction
            Gp = self.QL.mT @ G @ self.QR
            self.M = self.b1 * self.M + (1 - self.b1) * Gp  # rotated first moment m'
            self.V = self.b2 * self.V + (1 - self.b2) * Gp * Gp
            Dir = self.QL @ (self.M / (self.V.sqrt() + self.eps)) @ self.QR.mT
        else:
            # 1. momentum, original basis, no bias correction
            self.M = self.b1 * self.M + (1 - self.b1) * G
            # 2. direction with the OLD Q and s
            Hm = self.QL.mT @ self.M @ self.QR
            ss = self.sL[:, None] * self.sR[None, :]
            P = ss / (1 + self.eps * ss)
            Dir = self.QL @ (Hm * P) @ self.QR.mT
        if self.normalize:  # §6.6
            Dir = Dir / (1e-30 + Dir.square().mean().sqrt())
        # 3. factors with the other side's tracked inverse
        if self.full[0]:
            A = G @ self.QR * self.sR[None, :]
            SL_new = rho * self.SL + (1 - rho) / n * A @ A.mT
        if self.full[1]:
            B = self.sL[:, None] * (self.QL.mT @ G)
            SR_new = rho * self.SR + (1 - rho) / m * B.mT @ B
        # 4. eigenvalues
        H = self.QL.mT @ G @ self.QR
        dL = (H**2 * self.sR[None, :] ** 2).sum(1) / n
        dR = (H**2 * self.sL[:, None] ** 2).sum(0) / m
        if self.kappa:
            dL = dL + self.kappa * (self.sR**2).mean()
            dR = dR + self.kappa * (self.sL**2).mean()
        new_s = []
        for side, (s, d, dim) in enumerate(((self.sL, dL, m), (self.sR, dR, n))):
            if not self.full[side]:
                new_s.append(s)
                continue
            lam_prev = 1 / s**2
            lam_prev = torch.where(torch.isfinite(lam_prev), lam_prev, torch.zeros_like(lam_prev))
            lam = rho * lam_prev + (1 - rho) * d
            s2 = 1 / lam.sqrt()
            s2 = torch.where(torch.isfinite(s2), s2, torch.zeros_like(s2))
            if self.clamping:
                self.clamp_hits = getattr(self, "clamp_hits", 0) + int((s2 > self.clamp_c(dim)).sum())
                s2 = s2.clamp_max(self.clamp_c(dim))
            new_s.append(s2)
        self.sL, self.sR = new_s
        if self.full[0]:
            self.SL = SL_new
        if self.full[1]:
            self.SR = SR_new
        # 5. refresh, no sorting
        if self.t % self.f == 0:
            M_orig = self.QL @ self.M @ self.QR.mT  # KL-SOAP: m' rotated out with the old Q ...
            if self.full[0]:
                self.QL = qr_q(self.SL @ self.QL)
            if self.full[1]:
                self.QR = qr_q(self.SR @ self.QR)
            if self.klsoap:  # ... and back in with the new Q; v neither rotated nor permuted
                self.M = self.QL.mT @ M_orig @ self.QR
        # 6. W <- W - lr D, then decay
        W = W - self.lr * Dir
        W = W - self.lr * self.wd * W
        return W.reshape(self.shape)


# ----------------------------------------------------------------------------------------- Pro-KLShampoo
class ProKlRef:
    """pro_kl_shampoo.md §5-§7, the right side restricted to rank r (``side="left"``: the same on the transposed
    block), ``complement_scale`` 'identity' | 'muon' | 'match_rms_adamw' | 'whitened' (docs/kl.md) | a number,
    ``tracker`` 'power' | 'sketch', subspace eigenvalues tracked. ``refresh_order``:
      'spec'   - §7 literally: U_new = QR(R_new U); S' = U_new^T R U_new; diagonalise S' = V E V^T; U <- U_new V;
      'kl_md'  - docs/kl.md's documented variant: Rayleigh-Ritz first (U^T P = V E V^T), U' = orth(P V),
                 S' = T S T^T + mu (I - T T^T), not re-diagonalised; sigma' from the old U's tracked form.
    Clamping (kl_shampoo.md §6.4) applies to s_L; sigma and mu get no clamp here (the spec states none).
    """

    def __init__(self, shape, *, lr, b1, rho, eps, wd, f, init_factor, rank, max_clamp=4000.0, clamping=True,
                 refresh_order="spec", ns_steps=5, ns_dtype=D, complement_scale="identity", tracker="power",
                 side="right"):
        self.shape = tuple(shape)
        self.m, self.n = block_shape(self.shape)
        self.transposed = side == "left"  # a left restriction is the right one of the transposed block
        if self.transposed:
            self.m, self.n = self.n, self.m
        self.r = rank
        self.complement_scale, self.tracker = complement_scale, tracker
        self.lr, self.b1, self.rho, self.eps, self.wd, self.f = lr, b1, rho, eps, wd, f
        self.init_factor, self.max_clamp, self.clamping = init_factor, max_clamp, clamping
        self.refresh_order = refresh_order
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        self.calls = 0
        self.t = 0

    def step(self, W, G, adopt=None):
        mm, nn = block_shape(self.shape)
        W, G = W.reshape(mm, nn), G.reshape(mm, nn)
        if self.transposed:
            return self._step(W.mT, G.mT, adopt).mT.reshape(self.shape)
        return self._step(W, G, adopt).reshape(self.shape)

    def comp_scale(self, C, O, sL_old, QL_old, mu_old):
        m, n, r = self.m, self.n, self.r
        cs = self.complement_scale
        if cs == "identity":
            return math.sqrt(n - r)
        if cs == "muon":  # sqrt(max(1, m/n)) of the parameter's own block (m, n un-transposed)
            a, b = (n, m) if self.transposed else (m, n)
            return math.sqrt(max(1.0, a / b))
        if cs == "match_rms_adamw":
            return 0.2 * math.sqrt(max(m, n))
        if cs == "whitened":  # docs/kl.md: NS(C) rescaled to ||mu^-1/2 L^-1/2 C||_F (tracked values)
            target = torch.linalg.matrix_norm(QL_old @ (sL_old[:, None] * (QL_old.mT @ C))) / mu_old.sqrt()
            return target / torch.linalg.matrix_norm(O)
        return float(cs)

    def _step(self, W, G, adopt=None):
        m, n, r, rho = self.m, self.n, self.r, self.rho
        W = W.clone()
        G = G.to(D)
        self.calls += 1
        if self.calls == 1:  # §6 "First call"
            self.SL = (1 - rho) * G @ G.mT / n
            Q = eigh_desc(self.SL)[1]
            adopt_Q, adopt_U = adopt if isinstance(adopt, tuple) else (adopt, None)
            self.QL = Q if adopt_Q is None else check_and_adopt(Q, self.SL, adopt_Q)
            Vh = torch.linalg.svd(G, full_matrices=True)[2]
            self.U = Vh[:r, :].mT.contiguous()
            if adopt_U is not None and int(torch.linalg.matrix_rank(G)) < r:
                # "completed by a fixed orthonormal set if rank G < r" (§6): the set is not specified; accept the
                # implementation's U iff it is orthonormal and contains G's whole row space
                Ua = adopt_U.detach().to(D).clone()
                ok = torch.linalg.matrix_norm(Ua.mT @ Ua - torch.eye(r, dtype=D)) < 1e-10
                ok = ok and torch.linalg.matrix_norm(G - G @ Ua @ Ua.mT) <= 1e-10 * max(1.0, float(G.norm()))
                if ok:
                    self.U = Ua
            self.S = (1 - rho) * self.U.mT @ G.mT @ G @ self.U / m
            self.sL = torch.full((m,), self.init_factor**-0.5, dtype=D)
            self.sigma = torch.full((r,), self.init_factor, dtype=D)
            self.mu = torch.tensor(self.init_factor, dtype=D)
            self.M = torch.zeros(m, n, dtype=D)
            self.B = self.U @ self.S
            return W
        self.t += 1
        U, sig, mu, sL, QL = self.U, self.sigma, self.mu, self.sL, self.QL
        # momentum (KL-Shampoo's)
        self.M = self.b1 * self.M + (1 - self.b1) * G
        M = self.M
        # §5 direction
        tau = sig**-0.5
        ss = sL[:, None] * tau[None, :]
        P = ss / (1 + self.eps * ss)
        D_sub = QL @ ((QL.mT @ M @ U) * P) @ U.mT
        C = M - (M @ U) @ U.mT
        O = newton_schulz(C, steps=self.ns_steps, dtype=self.ns_dtype).to(D)
        D_comp = self.comp_scale(C, O, sL, QL, mu) * O
        Delta = D_sub + D_comp
        # §6 per-step updates from the old state
        Y = G @ U
        QtG = QL.mT @ G
        QtY = QL.mT @ Y
        SL_new = rho * self.SL + (1 - rho) / n * (Y @ torch.diag(1 / sig) @ Y.mT + (G @ G.mT - Y @ Y.mT) / mu)
        dL = ((QtY**2 / sig[None, :]).sum(1) + ((QtG**2).sum(1) - (QtY**2).sum(1)) / mu) / n
        lam_prev = 1 / sL**2
        lam = rho * lam_prev + (1 - rho) * dL
        sL_new = 1 / lam.sqrt()
        if self.clamping:
            sL_new = sL_new.clamp_max(max(10.0, min(m, self.max_clamp)))
        Gh = sL[:, None] * QtG
        Yh = sL[:, None] * QtY
        S_old = self.S
        self.S = rho * self.S + (1 - rho) / m * Yh.mT @ Yh
        self.sigma = rho * sig + (1 - rho) / m * (Yh**2).sum(0)
        self.mu = rho * mu + (1 - rho) / (m * (n - r)) * ((Gh**2).sum() - (Yh**2).sum())
        self.SL, self.sL = SL_new, sL_new
        self.B = rho * self.B + (1 - rho) / m * Gh.mT @ Yh  # §7 sketch
        if self.t % self.f == 0:
            self.QL = qr_q(self.SL @ self.QL)
            Pw = rho * U @ S_old + (1 - rho) / m * Gh.mT @ Yh  # = R_new U (§7 power)
            self.refresh_right(Pw if self.tracker == "power" else self.B)
            self.B = self.U @ self.S
        W = W - self.lr * Delta
        W = W - self.lr * self.wd * W
        return W

    def refresh_right(self, Pw):
        n, r = self.n, self.r
        U, S, sig, mu = self.U, self.S, self.sigma, self.mu
        if self.refresh_order == "spec":
            Un = qr_q(Pw)
            T = Un.mT @ U  # r x r
            S1 = T @ S @ T.mT + mu * (torch.eye(r, dtype=D) - T @ T.mT)
            mu1 = (torch.trace(S) + (n - r) * mu - torch.trace(S1)) / (n - r)
            E, V = eigh_desc(S1)
            Sig1 = T @ torch.diag(sig) @ T.mT + mu * (torch.eye(r, dtype=D) - T @ T.mT)
            self.U = Un @ V
            self.S = torch.diag(E)
            self.sigma = torch.diagonal(V.mT @ Sig1 @ V).clone()
            self.mu = mu1
        else:  # 'kl_md': docs/kl.md's documented order
            E, V = eigh_desc(U.mT @ Pw)  # Rayleigh-Ritz on span(U) (U^T P = S_new)
            Ur = U @ V
            Un = qr_q(Pw @ V)  # one power step
            T = Un.mT @ Ur
            eye = torch.eye(r, dtype=D)
            Sr = V.mT @ S @ V
            S1 = T @ Sr @ T.mT + mu * (eye - T @ T.mT)  # not re-diagonalised
            mu1 = (torch.trace(Sr) + (n - r) * mu - torch.trace(S1)) / (n - r)
            To = Un.mT @ U  # sigma: the tracked form U diag(sigma) U^T + mu P_perp re-projected onto U'
            self.sigma = torch.diagonal(To @ torch.diag(sig) @ To.mT + mu * (eye - To @ To.mT)).clone()
            self.U, self.S, self.mu = Un, S1, mu1


# ----------------------------------------------------------------------------------------- Shampoo (soap.md §9)
class ShampooRef:
    """soap.md §9: EMA factors (updated before the direction, every step), eigh every f steps keeping the
    eigenvalues, bias-corrected first moment in the original basis, exponent -1/4 per side with eps inside the
    root, layer-wise Adam grafting (D = P ||A|| / ||P||; A before the first basis exists), decoupled decay.
    The refresh of update t (t mod f == 0) precedes that update's direction (factor_update = "before")."""

    def __init__(self, shape, *, lr, b1, rho, eps, wd, f, gb2, geps, max_dim=10000, exponent=-0.25,
                 wd_before=True):
        self.shape = tuple(shape)
        self.m, self.n = block_shape(self.shape)
        self.full = (False, False) if len(self.shape) == 1 else (self.m <= max_dim, self.n <= max_dim)
        self.lr, self.b1, self.rho, self.eps, self.wd, self.f = lr, b1, rho, eps, wd, f
        self.gb2, self.geps, self.p, self.wd_before = gb2, geps, exponent, wd_before
        self.t = 0
        m, n = self.m, self.n
        self.L = torch.zeros(m, m, dtype=D)
        self.R = torch.zeros(n, n, dtype=D)
        self.M = torch.zeros(m, n, dtype=D)
        self.Vg = torch.zeros(m, n, dtype=D)
        self.basis = None

    def root(self, lam, Q):
        return Q @ torch.diag((lam.clamp_min(0) + self.eps) ** self.p) @ Q.mT

    def step(self, W, G, adopt=None):
        m, n = self.m, self.n
        W = W.reshape(m, n).clone()
        G = G.reshape(m, n).to(D)
        self.t += 1
        t = self.t
        if self.full[0]:
            self.L = self.rho * self.L + (1 - self.rho) * G @ G.mT
        if self.full[1]:
            self.R = self.rho * self.R + (1 - self.rho) * G.mT @ G
        if t % self.f == 0:
            self.basis = (eigh_desc(self.L), eigh_desc(self.R))
        self.M = self.b1 * self.M + (1 - self.b1) * G
        mhat = self.M / (1 - self.b1**t)
        self.Vg = self.gb2 * self.Vg + (1 - self.gb2) * G * G
        A = mhat / ((self.Vg / (1 - self.gb2**t)).sqrt() + self.geps)
        if self.basis is None:
            Dir = A
        else:
            (lL, QL), (lR, QR) = self.basis
            P = mhat
            if self.full[0]:
                P = self.root(lL, QL) @ P
            if self.full[1]:
                P = P @ self.root(lR, QR)
            Dir = P * torch.linalg.matrix_norm(A) / torch.linalg.matrix_norm(P)
        if self.wd_before:
            W = W * (1 - self.lr * self.wd)
            W = W - self.lr * Dir
        else:
            W = W - self.lr * Dir
            W = W - self.lr * self.wd * W
        return W.reshape(self.shape)


# ----------------------------------------------------------------------------------------- harness
def grads_stream(shapes, steps, *, seed=0, zero_steps=(), scales=(1.0,)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        sc = 0.0 if k in zero_steps else scales[k % len(scales)]
        out.append([torch.randn(s, generator=g, dtype=D) * sc for s in shapes])
    return out


def run_against(preset, refs, shapes, grads, overrides, adopt=None, *, seed=1):
    """Feed the same gradients to kronopt and to the references; the worst relative deviation per parameter.
    ``adopt(state, ref)`` gives what the reference may take over on its first call (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=D)) for s in shapes]
    Ws = [p.detach().clone() for p in params]
    opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], preset, **overrides)
    worst = [0.0] * len(shapes)
    per_call = []
    for row in grads:
        for p, gg in zip(params, row):
            p.grad = gg.clone()
        opt.step()
        errs = []
        for i, (p, ref, gg) in enumerate(zip(params, refs, row)):
            if isinstance(ref, (MuonRef, ShampooRef)):
                Ws[i] = ref.step(Ws[i], gg)
            else:
                a = adopt(opt.state[p], ref) if adopt is not None and ref.calls == 0 else None
                Ws[i] = ref.step(Ws[i], gg, a)
            err = float((p.detach() - Ws[i]).abs().max()) / max(1.0, float(Ws[i].abs().max()))
            errs.append(err)
            worst[i] = max(worst[i], err)
        per_call.append(errs)
    return worst, per_call, opt, params


def full_bases(state, ref):
    """(Q_L, Q_R) of a two-sided block; a missing (unrotated) side as a 1 x 1 placeholder the reference ignores."""
    one = torch.eye(1, dtype=D)
    return state.get("basis.Q_L", one), state.get("basis.Q_R", one)


def pro_bases(state, ref):
    """(the full side's basis, the restricted side's U), in the reference's (possibly transposed) orientation."""
    if ref.transposed:
        return state["basis.Q_R"], state["basis.Q_L"]
    return state["basis.Q_L"], state["basis.Q_R"]


TOL = 1e-9
#: square, tall, wide, 1 x n, n x 1 (n small enough that the factors are full rank by the first refresh),
#: 1-D, a 4-D conv kernel (3, 8), a 3-D tensor (4, 15 > max_dim: right side unrotated), left side > max_dim
SHAPES = [(6, 6), (8, 4), (3, 7), (1, 5), (5, 1), (5,), (3, 2, 2, 2), (4, 3, 5), (12, 4)]
MAX_DIM = 10
STREAM = dict(zero_steps=(7, 8), scales=(1.0, 0.1, 10.0, 1.0, 0.01, 30.0))


def _soap_hp(**kw):
    # presets.py SOAP: lr 1e-2, wd 1e-2, betas (0.95, 0.95), factors.beta 0.95 (= beta2), eps 1e-8
    hp = dict(lr=1e-2, betas=(0.95, 0.95), rho=0.95, eps=1e-8, wd=1e-2, f=5, max_dim=MAX_DIM)
    hp.update(kw)
    return hp


SOAP_OVERRIDES = {"refresh.every": 5, "shapes.max_dim": MAX_DIM}


# ----------------------------------------------------------------------------------------- SOAP
@pytest.mark.parametrize(
    "ref_kw, overrides",
    [
        ({}, {}),
        ({"normalize": True, "betas": (0.9, 0.95), "rho": 0.9},
         {"inner.normalize": True, "inner.betas": [0.9, 0.95], "factors.beta": 0.9}),
        ({"correct_bias": False}, {"inner.bias_correction": False}),
        ({"precondition_1d": True}, {"shapes.precondition_1d": True}),
    ],
    ids=["preset", "normalize_grads", "no_bias_correction", "precondition_1d"],
)
def test_soap_follows_the_spec_step_for_step(ref_kw, overrides):
    """soap.md §5-§7: first call builds only; eps on the un-corrected sqrt(v); bias-corrected step size; decay after
    the step with the raw lr; factors after the write; refresh at t mod f == 0 with Rayleigh-quotient sort, v
    permuted, one power step + QR, m carried to the new basis; a side > max_dim and 1-D parameters unrotated."""
    refs = [SoapRef(s, **_soap_hp(**ref_kw)) for s in SHAPES]
    grads = grads_stream(SHAPES, 32, **STREAM)
    worst, _, _, _ = run_against("soap", refs, SHAPES, grads, {**SOAP_OVERRIDES, **overrides}, full_bases)
    assert max(worst) < TOL, dict(zip(SHAPES, worst))


def test_soap_merge_dims_blocks_follow_the_greedy_rule():
    """soap.md §7 merge_dims (max 10): (3, 2, 2, 2) -> (6, 4); (2, 3, 5) -> (6, 5); then the two-sided SOAP step."""
    shapes, blocks = [(3, 2, 2, 2), (2, 3, 5)], [(6, 4), (6, 5)]
    refs = [SoapRef(s, block=b, **_soap_hp()) for s, b in zip(shapes, blocks)]
    grads = grads_stream(shapes, 20, **STREAM)
    worst, _, opt, params = run_against(
        "soap", refs, shapes, grads, {**SOAP_OVERRIDES, "shapes.merge_dims": True}, full_bases
    )
    assert [tuple(opt.state[p]["inner.exp_avg"].shape) for p in params] == blocks
    assert max(worst) < TOL, worst


def test_shampoo_follows_soap_spec_section_9():
    """soap.md §9 + the preset (factors updated before the direction, eigh at t mod f == 0, eps 1e-12 inside the
    -1/4 root, D = P ||A|| / ||P|| with A the Adam direction on the raw gradient, A alone before the first basis,
    decay before the step)."""
    shapes = [s for s in SHAPES]
    hp = dict(lr=1e-2, b1=0.95, rho=0.95, eps=1e-12, wd=0.1, f=5, gb2=0.95, geps=1e-8, max_dim=MAX_DIM)
    refs = [ShampooRef(s, **hp) for s in shapes]
    grads = grads_stream(shapes, 26, **STREAM)
    worst, _, _, _ = run_against(
        "shampoo", refs, shapes, grads, {"refresh.every": 5, "shapes.max_dim": MAX_DIM, "weight_decay": 0.1}
    )
    assert max(worst) < TOL, dict(zip(shapes, worst))


# ----------------------------------------------------------------------------------------- DyKAF
def _dykaf_hp(**kw):
    return _soap_hp(**kw)  # dykaf.md §11: the soap preset's hyperparameters


@pytest.mark.parametrize(
    "preset, ref_kw, overrides",
    [
        ("dykaf", {}, {}),
        ("dykaf", {"init": "kron_reference"}, {"factors.init": "kron_reference"}),
        ("dykaf", {"init": "eps", "variant": "parallel"}, {"factors.init": "eps", "factors.variant": "parallel"}),
        ("dykaf", {"init": "sum"}, {"factors.init": "sum"}),
        ("dykaf", {"one_sided": "sum"}, {"factors.one_sided": "sum"}),
        ("dykaf", {"precondition_1d": True}, {"shapes.precondition_1d": True}),
        ("dykaf_rank1", {"rank1": True, "lr": 5e-3}, {}),
    ],
    ids=["preset", "kron_reference", "eps_parallel", "sum", "one_sided_sum", "precondition_1d", "rank1"],
)
def test_dykaf_follows_the_spec_step_for_step(preset, ref_kw, overrides):
    """dykaf.md §3 (KSL pseudo code), §4 (parallel), §5 (kron start = sqrt(1-beta) sigma1 per factor, NOT fed
    through the integrator again; kron_reference: sqrt(sigma1), fed once more; eps/sum: fed), §6 (SOAP around it),
    §7 (rank-1 second moment l r^T, permuted at refresh), §8 (a side > max_dim: SOAP EMA or the authors' sum)."""
    lr = ref_kw.pop("lr", None)
    hp = _dykaf_hp(**({"lr": lr} if lr else {}))
    rank1 = ref_kw.pop("rank1", False)
    p1d = ref_kw.pop("precondition_1d", False)
    refs = [DykafRef(s, rank1=rank1, precondition_1d=p1d, **ref_kw, **hp) for s in SHAPES]
    grads = grads_stream(SHAPES, 26, **STREAM)
    worst, _, _, _ = run_against(preset, refs, SHAPES, grads, {**SOAP_OVERRIDES, **overrides}, full_bases)
    assert max(worst) < TOL, dict(zip(SHAPES, worst))


def test_dykaf_zero_first_gradient_starts_late_as_a_first_call():
    """dykaf.md §5: a block whose first gradient is exactly zero stays uninitialised (no update, no step count)
    until a nonzero one arrives, which is its first call."""
    shapes = [(6, 5)]
    refs = [DykafRef(s, **_dykaf_hp()) for s in shapes]
    grads = grads_stream(shapes, 12, zero_steps=(0, 1))
    worst, per_call, opt, params = run_against("dykaf", refs, shapes, grads, SOAP_OVERRIDES, full_bases)
    assert opt.state[params[0]]["step"] == refs[0].t  # 9 updates, not 11
    assert max(worst) < TOL, per_call


@pytest.mark.parametrize("preset", ["dykaf", "dykaf_rank1"])
def test_dykaf_zero_first_gradient_starts_late_beside_a_block_that_started(preset):
    """The same in a bucket: two blocks of one shape, the first with zero gradients on its first two steps (LoRA's
    ``A`` while ``B = 0``), the second never; each follows the spec's reference on its own schedule. Catches: the
    late block stepped with its bucket's counters (bias correction, refresh schedule) or from the in-bucket start
    (from the identity direction, not the first nonzero gradient's SVD)."""
    shapes = [(6, 5), (6, 5)]
    rank1 = preset == "dykaf_rank1"
    refs = [DykafRef(s, rank1=rank1, **_dykaf_hp(**({"lr": 5e-3} if rank1 else {}))) for s in shapes]
    grads = grads_stream(shapes, 14)
    for k in (0, 1):
        grads[k][0] = grads[k][0] * 0
    worst, per_call, opt, params = run_against(preset, refs, shapes, grads, SOAP_OVERRIDES, full_bases)
    assert [opt.state[p]["step"] for p in params] == [refs[0].t, refs[1].t] == [11, 13]
    assert max(worst) < TOL, per_call


# ----------------------------------------------------------------------------------------- KL-Shampoo / KL-SOAP
KL_SHAPES = [s for s in SHAPES if len(s) > 1]  # 1-D parameters go to the AdamW fallback (kl_shampoo.md §8)


def _kl_hp(**kw):
    # presets.py KL_SHAMPOO: lr 0.1, wd 0.01, momentum 0.9, rho 0.98, eps 1e-8, init_factor 0.1, clamp 4000
    hp = dict(lr=0.1, b1=0.9, rho=0.98, eps=1e-8, wd=1e-2, f=5, init_factor=0.1, max_dim=MAX_DIM)
    hp.update(kw)
    return hp


@pytest.mark.parametrize(
    "preset, ref_kw, overrides",
    [
        ("kl_shampoo", {}, {}),
        ("kl_shampoo", {"damping": 0.05, "rho": 0.9}, {"factors.damping": 0.05, "factors.beta": 0.9}),
        ("kl_shampoo", {"normalize": True}, {"post.normalize": True}),
        ("kl_soap", {"klsoap": True, "b2": 0.98, "lr": 3e-3}, {}),
    ],
    ids=["preset", "damping", "normalize_grads", "kl_soap"],
)
def test_kl_follows_the_spec_step_for_step(preset, ref_kw, overrides):
    """kl_shampoo.md §5-§7: both sides from the old Q and s; the other side's inverse from the tracked roots;
    d statistics from H = Q_L^T G Q_R; lambda EMA, non-finite -> 0, clamp at max(10, min(d, 4000)); QR refresh
    without sorting; eps on the product; decay after the step; a side > max_dim has s = 1 (§8)."""
    refs = [KlRef(s, **_kl_hp(**ref_kw)) for s in KL_SHAPES]
    grads = grads_stream(KL_SHAPES, 30, **STREAM)
    worst, _, _, _ = run_against(preset, refs, KL_SHAPES, grads, {**SOAP_OVERRIDES, **overrides}, full_bases)
    assert max(worst) < TOL, dict(zip(KL_SHAPES, worst))


def test_kl_clamp_is_hit_and_followed():
    """kl_shampoo.md §6.4 with the clamp active: c = max(10, min(d, 4000)) per side (16 for the 16-row side)."""
    shapes = [(16, 5), (6, 12)]
    hp = _kl_hp(rho=0.7, max_dim=20)
    refs = [KlRef(s, **hp) for s in shapes]
    grads = grads_stream(shapes, 24, scales=(1e-3,))
    worst, _, _, _ = run_against(
        "kl_shampoo", refs, shapes, grads, {"refresh.every": 5, "shapes.max_dim": 20, "factors.beta": 0.7}, full_bases
    )
    assert all(getattr(r, "clamp_hits", 0) > 0 for r in refs)
    assert max(worst) < TOL, worst


# ----------------------------------------------------------------------------------------- Muon
MUON_SHAPES = [(6, 6), (8, 4), (3, 7), (1, 5), (5, 1), (3, 2, 2, 5), (4, 3, 5)]


@pytest.mark.parametrize(
    "ref_kw, overrides",
    [
        ({}, {}),
        ({"coefficients": "polar_express", "steps": 10}, {"inner.coefficients": "polar_express", "inner.steps": 10}),
        ({"coefficients": "quintic", "steps": 7}, {"inner.coefficients": "quintic", "inner.steps": 7}),
        ({"coefficients": "cans", "steps": 7}, {"inner.coefficients": "cans", "inner.steps": 7}),
        ({"coefficients": "deepseekv4", "steps": 12}, {"inner.coefficients": "deepseekv4", "inner.steps": 12}),
        ({"norm": "add", "form": "classic"}, {"inner.norm": "add", "inner.momentum_form": "classic"}),
        ({"nesterov": False, "scale": "match_rms_adamw", "extra_scale": 0.5},
         {"inner.nesterov": False, "inner.scale": "match_rms_adamw", "inner.extra_scale": 0.5}),
        ({"scale": "spectral"}, {"inner.scale": "spectral"}),
        ({"scale": "unit_rms_norm"}, {"inner.scale": "unit_rms_norm"}),
        ({"scale": "none", "scale_shape": "last_two_dims"},
         {"inner.scale": "none", "inner.scale_shape": "last_two_dims"}),
        ({"scale_shape": "last_two_dims"}, {"inner.scale_shape": "last_two_dims"}),
    ],
    ids=["preset", "polar_express", "quintic", "cans", "deepseekv4", "add_classic", "plain_adamw_scale", "spectral",
         "unit_rms", "none_last2", "original_last2"],
)
def test_muon_follows_the_spec_step_for_step(ref_kw, overrides):
    """muon.md §2-§5 with NS in float64: EMA/classic momentum, Nesterov, the §4 coefficient tables and their
    beyond-the-list rules, clamp/add normalisation, decay before the step with the raw lr, the §5 scale rules from
    the flattened block (or the last two dims)."""
    refs = [MuonRef(s, lr=3e-2, wd=0.1, beta=0.95, **ref_kw) for s in MUON_SHAPES]
    grads = grads_stream(MUON_SHAPES, 14, zero_steps=(3,), scales=(1.0, 1e-3, 1e2))
    worst, _, _, _ = run_against("muon", refs, MUON_SHAPES, grads, {"inner.ns_dtype": "float64", **overrides})
    assert max(worst) < TOL, dict(zip(MUON_SHAPES, worst))


# ----------------------------------------------------------------------------------------- Pro-KLShampoo
PRO_SHAPES = [(6, 10), (8, 8), (12, 6), (3, 2, 2, 2), (5, 9), (1, 8), (8, 1)]


def _side_of(shape, side):
    m, n = block_shape(shape)
    if side == "larger":
        return "right" if n >= m else "left"
    return side


def _pro_run(side, rank_of, overrides, ref_kw, *, order="kl_md", shapes=PRO_SHAPES, steps=26, stream=STREAM):
    hp = {k: v for k, v in _kl_hp().items() if k != "max_dim"}
    refs = [
        ProKlRef(s, **hp, rank=rank_of(s), refresh_order=order, side=_side_of(s, side), **ref_kw) for s in shapes
    ]
    grads = grads_stream(shapes, steps, **stream)
    ov = {"refresh.every": 5, "split.ns_dtype": "float64", **overrides}
    return run_against("pro_kl_shampoo", refs, shapes, grads, ov, pro_bases)


@pytest.mark.parametrize(
    "side, rank, overrides, ref_kw",
    [
        ("larger", None, {}, {"complement_scale": "whitened"}),
        ("right", 2, {"split.complement_scale": "identity"}, {"complement_scale": "identity"}),
        ("left", 2, {"split.complement_scale": "muon"}, {"complement_scale": "muon"}),
        ("right", 3, {"split.complement_scale": "match_rms_adamw"}, {"complement_scale": "match_rms_adamw"}),
        ("right", 1, {"split.complement_scale": 0.7, "split.complement_mult": 2.0}, {"complement_scale": 1.4}),
        ("right", 2, {"split.complement_scale": "identity", "factors.tracker": "sketch"},
         {"complement_scale": "identity", "tracker": "sketch"}),
        ("right", 0, {"split.complement_scale": "identity"}, {"complement_scale": "identity"}),
    ],
    ids=["preset", "identity_right", "muon_left", "adamw_scale", "float_scale", "sketch", "rank0"],
)
def test_pro_kl_shampoo_follows_spec_5_6_and_the_documented_refresh(side, rank, overrides, ref_kw):
    """pro_kl_shampoo.md §5 (subspace block with eps on the product + c NS(M - M U U^T)), §6 (S_L with the mu term,
    lambda_L's statistic, S, sigma, mu EMAs from the old state; first call: U = top-r right singular vectors),
    §7 power / sketch trackers; the refresh in docs/kl.md's documented order (Rayleigh-Ritz, then one power step,
    S' = T S T^T + mu (I - T T^T) not re-diagonalised, sigma' re-projected from the old U's tracked form).
    The preset row is the preset itself: larger side, r = min(128, d // 4), 'whitened' complement scale
    (docs/kl.md: NS(C) rescaled to ||mu^-1/2 L^-1/2 C||_F with the tracked values)."""
    rank_of = (lambda s: max(block_shape(s)) // 4) if rank is None else (lambda s: rank)
    ov = dict(overrides)
    shapes = PRO_SHAPES
    if rank is not None:  # an explicit rank on a side of length 1 would keep that side full (docs/kl.md)
        ov.update({"split.side": side, "split.rank": rank})
        shapes = PRO_SHAPES[:5]
    worst, _, _, _ = _pro_run(side, rank_of, ov, ref_kw, shapes=shapes)
    assert max(worst) < TOL, dict(zip(shapes, worst))


def test_pro_kl_shampoo_spec_refresh_order_is_a_small_documented_deviation():
    """pro_kl_shampoo.md §7 orders the refresh 'power step, re-project, diagonalise S' = V E V^T, U <- U_new V,
    sigma <- diag of the re-projection in that basis'; kronopt (docs/kl.md) does Rayleigh-Ritz first and does not
    re-diagonalise. Identical up to the first refresh; after it the two stay within 1e-4 of max|W| here."""
    shapes = [(6, 10), (8, 8), (12, 6), (3, 2, 2, 2)]
    ov = {"split.side": "right", "split.rank": 2, "split.complement_scale": "identity"}
    worst, per_call, _, _ = _pro_run(
        "right", lambda s: 2, ov, {"complement_scale": "identity"}, order="spec", shapes=shapes,
        stream=dict(scales=(1.0, 0.1, 10.0)),
    )
    assert max(max(e) for e in per_call[:6]) < TOL  # calls 1..6: no refresh has taken effect yet
    assert max(worst) < 1e-4, worst
