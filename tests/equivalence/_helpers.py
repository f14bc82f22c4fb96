"""What every preset-versus-reference comparison needs: gradients, a driver and the check."""

import torch


def reference_grads(gen, shapes, steps, *, first="surplus"):
    """Seeded float64 gradients, the first one made well posed for step-for-step comparison.

    A first basis built from G₁ alone is rank deficient for a non-square block, so its
    null-space eigenvectors are fixed by round-off and two correct implementations diverge
    there. ``first="surplus"`` zeroes G₁'s rows/columns beyond ``min(m, n)`` (that null space is
    then spanned by coordinate vectors); ``"single"`` keeps one nonzero entry (for a rank-one
    start, whose completion is otherwise arbitrary); ``"random"`` keeps G₁ as drawn.
    """
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    for g in grads[0]:
        if g.ndim != 2:
            continue
        m, n = g.shape
        if first == "single":
            value = g[1, 2].item()
            g.zero_()
            g[1, 2] = value
        elif first == "surplus":
            g[min(m, n) :, :] = 0.0
            g[:, min(m, n) :] = 0.0
    return grads


def run_history(opt, params, grads):
    """Feed ``grads`` call by call; the parameters after each call."""
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12):
    """Every parameter after every call matches (the property: the preset is the algorithm)."""
    assert len(ours) == len(ref)
    for k, (a_k, b_k) in enumerate(zip(ours, ref)):
        for i, (a, b) in enumerate(zip(a_k, b_k)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"call {k}, param {i}: {m}")


#: pro_kl_shampoo reference keyword -> kronopt dotted override
PRO_KL_KEYMAP = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "refresh_every": "refresh.every",
    "shampoo_beta": "factors.beta",
    "init_factor": "factors.init_factor",
    "using_clamping": "factors.clamping",
    "max_clamp_value": "factors.max_clamp",
    "tracker": "factors.tracker",
    "rank": "split.rank",
    "max_rank": "split.max_rank",
    "side": "split.side",
    "complement_scale": "split.complement_scale",
    "complement_mult": "split.complement_mult",
    "ns_steps": "split.ns_steps",
}


def pro_kl_overrides(options, keymap=PRO_KL_KEYMAP):
    """The pro_kl_shampoo reference's options as kronopt overrides (float64 state and Newton–Schulz; the
    reference's betas, ε and damping on the estimator and the eigenvalue rule)."""
    out = {"state_dtype": "float64", "split.ns_dtype": "float64"}
    out.update({keymap[k]: v for k, v in options.items() if k in keymap})
    betas = options.get("betas", (0.9, 0.98))
    eps = options.get("eps", 1e-8)
    if "shampoo_beta" not in options:
        out["factors.beta"] = betas[1]
    out["inner.momentum"] = betas[0]
    out["inner.eps"] = eps
    out["factors.damping"] = eps if options.get("using_damping") else 0.0
    return out


#: pro_soap / pro_dykaf reference options → kronopt config keys
PRO_ADAM_KEYMAP = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "precondition_frequency": "refresh.every",
    "rank": "split.rank",
    "side": "split.side",
    "complement_mult": "split.complement_mult",
    "ns_steps": "split.ns_steps",
}


def pro_adam_overrides(options):
    """kronopt overrides for the pro_soap / pro_dykaf references' options (float64 state and Newton–Schulz)."""
    out = {"state_dtype": "float64", "split.ns_dtype": "float64"}
    out.update({PRO_ADAM_KEYMAP[k]: v for k, v in options.items() if k in PRO_ADAM_KEYMAP})
    betas = options.get("betas", (0.95, 0.95))
    out["inner.betas"] = betas
    out["factors.beta"] = options.get("shampoo_beta", betas[1])
    return out
