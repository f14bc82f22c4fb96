"""Review of the commits since 4f842ee (session 29): what a reading of them found, pinned (each fixed).

* ``KronOptimizer._split`` joins a split bucket's rows with ``torch.cat`` (as ``index_select`` did before it), which
  makes a contiguous (row-major) tensor whatever the stack's layout: the column-major bases that
  ``bases._fresh_columns`` and every QR/eigh refresh give come out row-major in both parts, and the stepped part's
  stacks change layout again at its next refresh, against docs/architecture.md ("no stack changes its layout while
  training"). On an AMD EPYC with MKL the products that read the row-major basis round otherwise, so a block of a
  split pro_soap bucket leaves the trajectory it has alone in its bucket (float32: last bits).
"""

import pytest
import torch

import kronopt
from kronopt import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def _strides(opt):
    """Per parameter and state key, the strides of its block of the bucket's stack (as made at construction)."""
    out = {}
    for bucket in opt._buckets:
        if bucket.state is None:
            continue
        for k, v in compose.flatten(bucket.state).items():
            if isinstance(v, torch.Tensor) and v.ndim == 3:
                for p in bucket.params:
                    out[(id(p), k)] = v.stride()[1:]
    return out


@pytest.mark.parametrize("preset", ["soap", "pro_kl_shampoo"])
def test_a_bucket_split_by_a_parameter_without_gradient_keeps_its_stacks_layout(preset):
    """Three same-shape weights in one bucket; at the third step the first has no gradient, which splits the bucket
    ([1, 2] stepped, [0] apart). Every block's stacks must keep the strides they were made with (a basis: column-
    major, ``stride(-2) == 1``), in both parts, right after the split and after the stepped part's next refreshes
    (``refresh.every = 2``), as docs/architecture.md promises of every stack."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 8, generator=gen)) for _ in range(3)]
    opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], preset, **{"refresh.every": 2})
    made = _strides(opt)
    assert any(k.startswith("basis.Q") and s[0] == 1 for (_, k), s in made.items()), "no column-major basis"
    seen = []
    for step in range(7):
        for i, p in enumerate(params):
            p.grad = None if (step >= 2 and i == 0) else torch.randn(12, 8, generator=gen)
        opt.step()
        seen.append(_strides(opt))
    assert len([b for b in opt._buckets if b.state is not None]) == 2  # the split happened
    for step, now in enumerate(seen):
        assert now == made, step


def test_the_advice_of_a_different_routing_refusal_works():
    """Two user groups saved in the order [a, b] and loaded into an optimizer built with [b, a]: every name is in
    another group, so the load is refused (torch.optim would hand a's state to b's parameters by position). The
    routing is the same; only the groups' order differs. Whatever the message advises must then work: where it
    names ``kronopt.from_state_dict``, that must rebuild the optimizer from these parameters and load the dict."""
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    named_a = [("a." + k, v) for k, v in a.named_parameters()]
    named_b = [("b." + k, v) for k, v in b.named_parameters()]
    opt = kronopt.build([{"params": named_a}, {"params": named_b, "lr": 1e-3}], "soap")
    for p in [*a.parameters(), *b.parameters()]:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    swapped = [{"params": named_b, "lr": 1e-3}, {"params": named_a}]
    with pytest.raises(ValueError, match="different routing") as refused:
        kronopt.build(swapped, "soap").load_state_dict(saved)
    if "from_state_dict" in str(refused.value):
        kronopt.from_state_dict(swapped, saved)


def test_off_a_cpu_plain_adamw_keeps_no_scratch_between_steps(monkeypatch):
    """docs/architecture.md: other devices take plain AdamW's scratch fresh from their caching allocator, a kept set
    holding 1.5 times the moments between steps (and one more per bucket size a split made). The device branch of
    ``KronOptimizer._scratch`` run on a CPU (``_CPU_KEEPS_SCRATCH`` off, AdamW on the stacks as on a GPU): after
    steps that split the bucket, nothing is kept; with it on, a set is kept (the CPU's path). Would catch: the kept
    set made on every device again."""
    from kronopt import optimizer as kopt

    monkeypatch.setattr(kopt, "_BLOCKWISE_MIN", 10**12)
    for keeps in (False, True):
        monkeypatch.setattr(kopt, "_CPU_KEEPS_SCRATCH", keeps)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)) for _ in range(3)]
        opt = kronopt.build(ps, "adamw")
        for t in range(4):
            for i, p in enumerate(ps):
                p.grad = None if (t == 2 and i == 0) else torch.randn(6, 4, generator=gen)
            opt.step()
        kept = opt.__dict__.get("_kept_scratch") or {}
        assert bool(kept) == keeps, keeps
