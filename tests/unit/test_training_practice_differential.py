"""How practitioners drive an optimizer in a training loop, against torch.optim and the float64 references.

Tied embedding/head weights reached through ``model.named_parameters()``, gradient accumulation over
micro-batches with ``clip_grad_norm_`` before the step, ``zero_grad(set_to_none=False)`` (a zero gradient is a
step, ``None`` is none), ``step(closure)``, a tall embedding whose long side is over ``max_precond_dim`` (and one
right at it), stacked 3-D and 4-D weights, experts that get a gradient only on some steps, freezing,
unfreezing and ``add_param_group`` mid-training, and ``torch.compile(model)``.

Every expected value comes from outside kronopt: ``torch.optim.AdamW`` / ``SGD`` / ``Muon`` where a preset
reduces to them, else the float64 references of ``tests/reference/`` fed the very gradients kronopt was
given (recorded before each step). Where a reference needs a well-posed first basis the first gradient of
a block is made full rank (``tests/equivalence/_helpers.reference_grads``), or the blocks are square.
"""

import copy
import warnings

import pytest
import torch

import kronopt
from tests.equivalence._helpers import reference_grads
from tests.reference.dykaf import dykaf_reference
from tests.reference.kl_shampoo import kl_reference
from tests.reference.shampoo import shampoo_reference
from tests.reference.soap import soap_reference

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _max_diff(a, b):
    return max(((x.detach() - y.detach()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def _rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item() for x, y in zip(a, b) if x.numel())


class TiedLM(torch.nn.Module):
    """A byte-level LM in miniature: tied embedding/head (one Parameter reached twice), a block, a bias."""

    def __init__(self, vocab=12, d=4, dtype=F64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d, dtype=dtype)
        self.block = torch.nn.Linear(d, d, dtype=dtype)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False, dtype=dtype)
        self.lm_head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        return self.lm_head(h + torch.tanh(self.block(h)))


def _batches(seed, n, vocab=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3, 6), generator=gen) for _ in range(n)]


def _train_recording(model, opt, batches, *, accum=2, clip=0.5, set_to_none=True):
    """Micro-batch accumulation, ``clip_grad_norm_``, step; returns the gradients each step was given."""
    seen = []
    for s in range(len(batches) // accum):
        for x in batches[s * accum : (s + 1) * accum]:
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return seen


def _replay_torch(init, seen, make):
    """A torch optimizer (``make(named params)``) fed the recorded gradients, from the same start."""
    params = {n: torch.nn.Parameter(x.clone()) for n, x in init.items()}
    opt = make(params)
    for grads in seen:
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
    return params


# -- tied weights, accumulation and clipping: the step takes exactly the gradients it is given ---------------


def test_tied_lm_with_accumulation_and_clipping_equals_torch_adamw_bit_for_bit():
    """Catches: a tied Parameter stepped twice (once per use), a gradient read before ``clip_grad_norm_``
    scaled it (a cached copy), state aliasing ``p.grad`` so that zeroing it and accumulating into it changes
    the moments (``zero_grad(set_to_none=False)`` keeps one gradient tensor across steps)."""
    torch.manual_seed(0)
    for set_to_none in (True, False):
        model = TiedLM()
        assert [n for n, _ in model.named_parameters()] == ["embed.weight", "block.weight", "block.bias"]
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = kronopt.build(list(model.named_parameters()), "adamw", lr=3e-2, weight_decay=0.1)
        seen = _train_recording(model, opt, _batches(1, 16), set_to_none=set_to_none)
        ref = _replay_torch(
            init, seen, lambda ps: torch.optim.AdamW(ps.values(), lr=3e-2, weight_decay=0.1, fused=True)
        )
        assert _max_diff(list(model.parameters()), list(ref.values())) == 0.0
        assert model.lm_head.weight is model.embed.weight


def test_tied_lm_under_muon_routes_the_tied_matrix_to_adamw_and_equals_torch():
    """Catches: the tied embedding/head (named once, by its first name) sent to Newton–Schulz, the routed
    AdamW not torch's with the fallback's hyperparameters, the Muon part not ``torch.optim.Muon``."""
    torch.manual_seed(0)
    model = TiedLM(dtype=torch.float32)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = kronopt.build(list(model.named_parameters()), "muon", lr=1e-3)
    routed = {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]}
    assert routed == {"embed.weight": "fallback", "block.weight": "main", "block.bias": "fallback"}
    seen = _train_recording(model, opt, _batches(2, 12))

    def make(ps):
        aux = torch.optim.AdamW(
            [ps["embed.weight"], ps["block.bias"]], lr=9e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0
        )
        muon = torch.optim.Muon([ps["block.weight"]], lr=1e-3, weight_decay=0.1)

        class Both:
            def step(self):
                aux.step()
                muon.step()

        return Both()

    ref = _replay_torch(init, seen, make)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=2e-6, atol=2e-7, msg=n)


@pytest.mark.parametrize("preset", ["soap", "shampoo"])
def test_tied_lm_with_a_tall_one_sided_embedding_equals_the_reference(preset):
    """The tied (12 × 4) embedding with ``max_precond_dim = 8``: its vocabulary side is not rotated (soap.md §7),
    its 4-side is. Catches: the long side rotated anyway, the short one not, the one-sided factor updated
    otherwise than the EMA, and any step on other gradients than the accumulated, clipped ones."""
    torch.manual_seed(3)
    model = TiedLM()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    if preset == "soap":
        opt = kronopt.build(
            list(model.named_parameters()), "soap", lr=3e-3, **{"refresh.every": 2, "shapes.max_dim": 8}
        )
    else:
        opt = kronopt.build(list(model.named_parameters()), "shampoo", **{
            "lr": 1e-3, "weight_decay": 0.0, "refresh.every": 2, "shapes.max_dim": 8, "inner.momentum": 0.95,
            "factors.beta": 0.95, "post.graft_betas": [0.95, 0.95],
        })
    sides = {(b["m"], b["n"]): b["sides"] for b in opt.bucket_summary()}
    assert sides[(12, 4)] == ("none", "full") and sides[(4, 4)] == ("full", "full")
    seen = _train_recording(model, opt, _batches(3, 20), set_to_none=False)
    names = list(init)
    grads = [[g[n] for n in names] for g in seen]
    if preset == "soap":
        ref = soap_reference([init[n] for n in names], grads, lr=3e-3, precondition_frequency=2, max_precond_dim=8)
    else:
        ref = shampoo_reference(
            [init[n] for n in names], grads, lr=1e-3, betas=(0.95, 0.95), graft_betas=(0.95, 0.95),
            precondition_frequency=2, max_precond_dim=8,
        )
    assert _rel_diff([p.detach() for p in model.parameters()], ref[-1]) < 1e-9
    assert _max_diff(list(model.parameters()), [init[n] for n in names]) > 1e-3  # it trained


def test_a_tied_weight_listed_twice_or_in_two_groups_is_refused_and_the_named_model_is_not():
    """torch.optim warns for a duplicate inside a group (and then steps the tensor twice per step) and refuses
    one in two groups; kronopt refuses both before building anything (not documented outside the code).
    ``named_parameters()`` (deduplicated) is the way in."""
    model = TiedLM()
    with pytest.raises(ValueError, match="more than once"):
        kronopt.build(list(model.named_parameters(remove_duplicate=False)), "muon")
    with pytest.raises(ValueError, match="more than one parameter group"):
        kronopt.build([{"params": list(model.parameters())}, {"params": [model.lm_head.weight]}], "soap")
    opt = kronopt.build(list(model.named_parameters()), "soap")
    before = opt.bucket_summary()
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [("lm_head.weight", model.lm_head.weight)]})
    assert opt.bucket_summary() == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.optim.AdamW(list(model.parameters()) + [model.lm_head.weight])
    assert any("duplicate parameters" in str(w.message) for w in caught)


# -- routing by the names real models give their parameters ----------------------------------------------------

#: (name, shape, pipeline the muon spec §7 asks for): embeddings and output heads to AdamW, hidden matrices to Muon
GPT2_NAMES = [
    ("transformer.wte.weight", (12, 4), "fallback"),  # tied with lm_head: named_parameters() keeps this name
    ("transformer.wpe.weight", (6, 4), "fallback"),
    ("transformer.h.0.attn.c_attn.weight", (4, 12), "main"),
    ("transformer.h.0.mlp.c_proj.weight", (8, 4), "main"),
]
LLAMA_NAMES = [
    ("model.embed_tokens.weight", (12, 4), "fallback"),
    ("model.layers.0.self_attn.o_proj.weight", (4, 4), "main"),
    ("model.layers.0.mlp.down_proj.weight", (4, 8), "main"),
    ("lm_head.weight", (12, 4), "fallback"),
]
META_LLAMA_NAMES = [
    ("tok_embeddings.weight", (12, 4), "fallback"),
    ("layers.0.attention.wo.weight", (4, 4), "main"),
    ("layers.0.feed_forward.w2.weight", (4, 8), "main"),
    ("output.weight", (12, 4), "fallback"),
]
#: HF BERT / RoBERTa / ViT: the attention output and the MLP down-projection sit in modules named ``output``
BERT_NAMES = [
    ("bert.embeddings.word_embeddings.weight", (12, 4), "fallback"),
    ("bert.encoder.layer.0.attention.self.query.weight", (4, 4), "main"),
    ("bert.encoder.layer.0.attention.output.dense.weight", (4, 4), "main"),
    ("bert.encoder.layer.0.intermediate.dense.weight", (8, 4), "main"),
    ("bert.encoder.layer.0.output.dense.weight", (4, 8), "main"),
]
#: HF BLOOM / Falcon (tied ``word_embeddings`` / ``lm_head``: named_parameters() keeps the embedding's name), minGPT
BLOOM_MINGPT_NAMES = [
    ("transformer.word_embeddings.weight", (12, 4), "fallback"),
    ("transformer.h.0.self_attention.dense.weight", (4, 4), "main"),
    ("tok_emb.weight", (12, 4), "fallback"),
    ("pos_emb", (1, 6, 4), "fallback"),
    ("blocks.0.attn.proj.weight", (4, 4), "main"),
]


def _routed(names, preset):
    params = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s, _ in names]
    opt = kronopt.build(params, preset)
    return {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]}


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
@pytest.mark.parametrize("names", [GPT2_NAMES, LLAMA_NAMES, META_LLAMA_NAMES], ids=["gpt2", "hf-llama", "meta-llama"])
def test_embeddings_and_heads_of_common_models_go_to_the_fallback_and_hidden_matrices_do_not(names, preset):
    assert _routed(names, preset) == {n: want for n, _, want in names}


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_hidden_matrices_in_modules_named_output_go_to_the_matrix_pipeline(preset):
    """muon.md §7: only embeddings, the output head and vectors go to AdamW. In HF BERT-style models every layer's
    attention output projection and MLP down-projection live under a module named ``output``."""
    assert _routed(BERT_NAMES, preset) == {n: want for n, _, want in BERT_NAMES}


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_embeddings_named_word_embeddings_tok_emb_or_pos_emb_go_to_the_fallback(preset):
    """muon.md §7: embeddings, including a tied embedding/head, go to AdamW. A tied model's
    ``named_parameters()`` gives the pair one name, the embedding's (BLOOM, Falcon: ``word_embeddings``)."""
    assert _routed(BLOOM_MINGPT_NAMES, preset) == {n: want for n, _, want in BLOOM_MINGPT_NAMES}


# -- zero gradients and missing gradients (MoE experts) --------------------------------------------------------

#: square blocks (a single gradient gives a full-rank factor) and a vector; the experts share a shape
EXPERT_SHAPES = [(5, 5), (5, 5), (5, 5), (4, 4), (5,)]
EXPERT_STEPS = 24


def _expert_schedule(seed):
    """Per call and parameter: a gradient, a zero gradient (``zero_grad(set_to_none=False)`` on an expert that
    got no tokens) or ``None`` (``set_to_none=True``); expert 1 is first reached at call 3."""
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in EXPERT_SHAPES] for _ in range(EXPERT_STEPS)]
    kind = torch.randint(0, 4, (EXPERT_STEPS, len(EXPERT_SHAPES)), generator=gen)  # 0: None, 1: zero, else a gradient
    kind[:3, 1] = 0
    kind[0, 0] = 1  # a zero gradient on a first call
    out = []
    for t in range(EXPERT_STEPS):
        row = []
        for i, s in enumerate(EXPERT_SHAPES):
            k = int(kind[t, i])
            row.append(None if k == 0 else torch.zeros(s, dtype=F64) if k == 1 else grads[t][i])
        out.append(row)
    init = [torch.randn(s, generator=gen, dtype=F64) for s in EXPERT_SHAPES]
    return init, out


def _run_kron(init, schedule, build):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = build([(f"experts.{i}.weight", p) for i, p in enumerate(params)])
    history = []
    for row in schedule:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt, params


def _reference_skipping_none(start, schedule, reference, **kw):
    """Each parameter alone through ``reference``, over the calls where it had a gradient (zero included)."""
    history = [[None] * len(start) for _ in schedule]
    for i in range(len(start)):
        calls = [t for t, row in enumerate(schedule) if row[i] is not None]
        ref = reference([start[i]], [[schedule[t][i]] for t in calls], **kw)
        current, j = start[i].clone(), 0
        for t in range(len(schedule)):
            if t in calls:
                current, j = ref[j][0], j + 1
            history[t][i] = current
    return history


def _kl_overrides(klsoap):
    out = {"lr": 1e-2, "refresh.every": 3, "factors.beta": 0.98, "factors.damping": 0.0, "inner.eps": 1e-8}
    out.update({"inner.betas": [0.9, 0.98]} if klsoap else {"inner.momentum": 0.9})
    return out


REFERENCE_CASES = {
    "soap": (
        lambda ps: kronopt.build(ps, "soap", lr=1e-2, **{"refresh.every": 3}),
        lambda start, s: _reference_skipping_none(start, s, soap_reference, lr=1e-2, precondition_frequency=3),
    ),
    "shampoo": (
        lambda ps: kronopt.build(ps, "shampoo", **{
            "lr": 1e-3, "weight_decay": 0.05, "refresh.every": 3, "inner.momentum": 0.95, "factors.beta": 0.95,
            "post.graft_betas": [0.95, 0.95],
        }),
        lambda start, s: _reference_skipping_none(
            start, s, shampoo_reference, lr=1e-3, weight_decay=0.05, betas=(0.95, 0.95), graft_betas=(0.95, 0.95),
            precondition_frequency=3,
        ),
    ),
    "dykaf": (
        lambda ps: kronopt.build(ps, "dykaf", lr=1e-2, **{"refresh.every": 3, "factors.init": "eps"}),
        lambda start, s: _reference_skipping_none(
            start, s, dykaf_reference, lr=1e-2, precondition_frequency=3, init="eps"
        ),
    ),
    "dykaf_rank1": (
        lambda ps: kronopt.build(ps, "dykaf_rank1", lr=1e-2, **{"refresh.every": 3, "factors.init": "eps"}),
        lambda start, s: _reference_skipping_none(
            start, s, dykaf_reference, lr=1e-2, precondition_frequency=3, init="eps", rank1=True
        ),
    ),
    "kl_shampoo": (
        lambda ps: kronopt.build(ps, "kl_shampoo", **_kl_overrides(False)),
        lambda start, s: _reference_skipping_none(start, s, kl_reference, lr=1e-2, precondition_frequency=3),
    ),
    "kl_soap": (
        lambda ps: kronopt.build(ps, "kl_soap", **_kl_overrides(True)),
        lambda start, s: _reference_skipping_none(
            start, s, kl_reference, lr=1e-2, precondition_frequency=3, using_klsoap=True
        ),
    ),
}


@pytest.mark.parametrize("preset", list(REFERENCE_CASES))
def test_experts_with_zero_and_missing_gradients_equal_the_reference(preset):
    """A zero gradient is a call (moments decay, factors decay, the step counter and bias correction advance,
    weight decay applies; SOAP's first call builds its basis from a zero factor); ``None`` is no call at all,
    so each expert's trajectory is the reference's over its own calls. Catches: a split bucket whose blocks
    share one counter or refresh schedule, a None gradient treated as zero or a zero one as None, an expert
    first reached late starting from the bucket's counters instead of its own."""
    build, reference = REFERENCE_CASES[preset]
    for seed in (11, 12):
        init, schedule = _expert_schedule(seed)
        if preset.startswith("kl"):  # the KL reference steps 2-D parameters only (its presets route vectors away)
            init, schedule = init[:-1], [row[:-1] for row in schedule]
        ours, opt, params = _run_kron(init, schedule, build)
        ref = reference(init, schedule)
        for t, (a, b) in enumerate(zip(ours, ref)):
            assert _rel_diff(a, b) < 1e-9, (preset, seed, t)
        for i, p in enumerate(params):
            calls = sum(row[i] is not None for row in schedule)
            assert opt.state[p]["calls"] == calls


@pytest.mark.parametrize("zero", [False, True], ids=["none", "zero"])
def test_muon_experts_with_missing_or_zero_gradients_equal_torch_muon(zero):
    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 4), (8, 4), (8, 4), (4, 8)]
    mask = torch.rand(12, len(shapes), generator=gen) < 0.6
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]

    def run(make):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps)
        for t in range(12):
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone() if mask[t, i] else (torch.zeros_like(p) if zero else None)
            opt.step()
        return ps

    ours = run(lambda ps: kronopt.build([(f"experts.{i}.w", p) for i, p in enumerate(ps)], "muon", lr=1e-3))
    ref = run(lambda ps: torch.optim.Muon(ps))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-6)


SGD = {
    "factors": {"type": "none"}, "basis": {"type": "identity"}, "split": {"type": "full"},
    "refresh": {"type": "every", "every": 1}, "skip_first_call": False, "lr": 0.05,
}


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 0.0), (0.9, False, 0.0), (0.0, False, 0.1)])
@pytest.mark.parametrize("zero", [False, True], ids=["none", "zero"])
def test_sgd_composition_with_missing_or_zero_gradients_equals_torch_sgd(momentum, nesterov, wd, zero):
    """The ``sgd`` rule on unrotated blocks is ``torch.optim.SGD``: a None gradient leaves the momentum buffer
    alone, a zero one decays it. (With momentum *and* weight decay the two differ: kronopt's decay is
    decoupled, torch.optim.SGD's is L2 added to the gradient, so it enters the momentum.)"""
    gen = torch.Generator().manual_seed(2)
    shapes = [(6, 4), (6, 4), (5,), (3, 2, 2), ()]
    mask = torch.rand(12, len(shapes), generator=gen) < 0.6
    init = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(12)]
    cfg = {**SGD, "weight_decay": wd, "inner": {"type": "sgd", "momentum": momentum, "nesterov": nesterov}}

    def run(make):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps)
        for t in range(12):
            for i, p in enumerate(ps):
                p.grad = grads[t][i].clone() if mask[t, i] else (torch.zeros_like(p) if zero else None)
            opt.step()
        return ps

    ours = run(lambda ps: kronopt.build(ps, cfg))
    ref = run(lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd, foreach=False
    ))
    assert _max_diff(ours, ref) < 1e-14


@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_step_leaves_the_gradients_it_was_given_untouched(preset):
    """torch.optim never writes into ``p.grad``; accumulation and ``zero_grad(set_to_none=False)`` rely on it.
    Catches: a gradient zeroed, upcast or sanitised in place, or replaced by another tensor, over first calls,
    plain steps and refreshes (every 2 calls where the preset refreshes every 10)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6, 4), (5, 5), (3,), (), (2, 3, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    every = {"refresh.every": 2} if kronopt.resolve(preset).refresh.every > 1 else {}
    opt = kronopt.build([(f"layers.{i}.w", p) for i, p in enumerate(params)], preset, lr=1e-2, **every)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        before = [(p.grad, p.grad.clone()) for p in params]
        opt.step()
        for p, (g, copy_) in zip(params, before):
            assert p.grad is g and torch.equal(g, copy_)


# -- step(closure) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo"])
def test_step_with_a_closure_behaves_as_torch_adamw(preset):
    """The closure runs exactly once, with grad enabled even when ``step`` is called under ``no_grad``, before
    the update and between the step hooks; ``step`` returns what it returned (a tensor, or any other value)."""

    def drive(opt, w, b, x):
        events = []
        opt.register_step_pre_hook(lambda *_: events.append("pre"))
        opt.register_step_post_hook(lambda *_: events.append("post"))

        def closure():
            events.append(("closure", torch.is_grad_enabled(), w.detach().clone()))
            opt.zero_grad()
            loss = ((x @ w.T + b) ** 2).mean()
            loss.backward()
            return loss

        with torch.no_grad():
            out = opt.step(closure)
        assert torch.is_tensor(out) and out.requires_grad
        assert opt.step(lambda: "anything") == "anything"  # gradients kept from the last closure
        return events, out

    def model():
        gen = torch.Generator().manual_seed(4)
        return (torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen)),
                torch.randn(8, 3, generator=gen))

    w, b, x = model()
    start = w.detach().clone()
    ours, loss = drive(kronopt.build([("block.w", w), ("block.b", b)], preset, lr=1e-2), w, b, x)
    tw, tb, tx = model()
    theirs, tloss = drive(torch.optim.AdamW([tw, tb], lr=1e-2), tw, tb, tx)
    def kinds(events):
        return [e if isinstance(e, str) else e[:2] for e in events]

    assert kinds(ours) == kinds(theirs) == ["pre", ("closure", True), "post", "pre", "post"]
    assert torch.equal(ours[1][2], start)  # the closure saw the parameters before the update
    assert torch.equal(loss.detach(), tloss.detach())


# -- tall embedding, head and max_precond_dim right at the side -------------------------------------------------

ONE_SIDED = [
    pytest.param(8, {(9, 4): ("none", "full"), (4, 9): ("full", "none"), (8, 4): ("full", "full")}, id="max-8"),
    pytest.param(9, {(9, 4): ("full", "full"), (4, 9): ("full", "full"), (8, 4): ("full", "full")}, id="max-9"),
]


@pytest.mark.parametrize("max_dim,sides", ONE_SIDED)
@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_soap"])
def test_embedding_and_head_at_and_over_max_precond_dim_equal_the_reference(preset, max_dim, sides):
    """A (9 × 4) embedding, a (4 × 9) head and an (8 × 4) block with ``max_precond_dim`` 8 (the 9-sides are not
    rotated, the side equal to 8 is: ``d ≤ max``) and 9 (everything rotated). soap.md §7, dykaf.md §8 (one side:
    the EMA on the other, no projector splitting), KL with ``s ≡ 1`` on the unrotated side."""
    shapes = [(9, 4), (4, 9), (8, 4)]
    gen = torch.Generator().manual_seed(8)
    grads = reference_grads(gen, shapes, 14)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    names = ["tok.embed.weight", "lm_head.weight", "block.w"]
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in zip(names, params)]
    common = {"refresh.every": 3, "shapes.max_dim": max_dim}
    if preset == "soap":
        opt = kronopt.build(named, "soap", lr=1e-2, **common)
        ref = soap_reference(params, grads, lr=1e-2, precondition_frequency=3, max_precond_dim=max_dim)
    elif preset == "dykaf":
        opt = kronopt.build(named, "dykaf", lr=1e-2, **common, **{"factors.init": "eps"})
        ref = dykaf_reference(params, grads, lr=1e-2, precondition_frequency=3, max_precond_dim=max_dim, init="eps")
    else:  # kl_soap routes embeddings and heads to AdamW by name: these names keep them in the KL pipeline
        named = [(f"blocks.{i}.weight", p) for i, (_, p) in enumerate(named)]
        opt = kronopt.build(named, "kl_soap", **{**_kl_overrides(True), **common})
        ref = kl_reference(params, grads, lr=1e-2, precondition_frequency=3, using_klsoap=True, max_precond_dim=max_dim)
    assert {(b["m"], b["n"]): b["sides"] for b in opt.bucket_summary()} == sides
    for t, step_grads in enumerate(grads):
        for (_, p), g in zip(named, step_grads):
            p.grad = g.clone()
        opt.step()
        assert _rel_diff([p.detach() for _, p in named], ref[t]) < 1e-9, t


# -- 3-D and 4-D weights ---------------------------------------------------------------------------------------

ND_CASES = [  # each refresh comes after enough gradients for full-rank factors (a well-posed comparison)
    pytest.param((3, 4, 4), {"refresh.every": 6}, (3, 16), id="qkv-stacked"),
    pytest.param((3, 4, 4), {"shapes.merge_dims": True, "shapes.max_dim": 16}, (12, 4), id="qkv-merged"),
    pytest.param((4, 2, 3, 3), {"refresh.every": 5}, (4, 18), id="conv"),
    pytest.param((4, 2, 3, 3), {"shapes.merge_dims": True, "shapes.max_dim": 8}, (8, 9), id="conv-merged"),
    pytest.param((2, 1, 2, 2), {"shapes.merge_dims": True, "shapes.max_dim": 100, "refresh.every": 8}, (8,),
                 id="conv-merged-one-mode"),
]


@pytest.mark.parametrize("shape,options,block", ND_CASES)
def test_nd_weights_step_as_soap_on_their_documented_block(shape, options, block):
    """A stacked qkv ``(3, d, d)`` and a conv kernel, with and without ``merge_dims``: SOAP on the block of the
    shape policy (``o, rest``; SOAP's greedy merge; one merged mode → ``(d, 1)`` with a d × d factor)."""
    gen = torch.Generator().manual_seed(9)
    start = torch.randn(shape, generator=gen, dtype=F64)
    options = {"refresh.every": 3, **options}
    every, max_dim = options["refresh.every"], options.get("shapes.max_dim", 10000)
    rows, cols = (block[0], 1) if len(block) == 1 else block
    # one mode: the first gradient with one entry, so the first basis's null space is spanned by coordinate vectors
    ref_grads = reference_grads(gen, [(rows, cols)], 16)
    if cols == 1:
        ref_grads[0][0][1:] = 0.0
    ref = soap_reference(
        [start.reshape(rows, cols)], ref_grads, lr=1e-2, precondition_frequency=every, max_precond_dim=max_dim
    )
    p = torch.nn.Parameter(start.clone())
    opt = kronopt.build([p], "soap", lr=1e-2, **options)
    # d ≤ max_dim rotates a side; the reference's 1 × 1 right factor of a (d, 1) block is ±1, no rotation
    sides = ("full" if rows <= max_dim else "none", "none" if len(block) == 1 or cols > max_dim else "full")
    assert [(b["m"], b["n"], b["sides"]) for b in opt.bucket_summary()] == [(rows, cols, sides)]
    for t, (g,) in enumerate(ref_grads):
        p.grad = g.reshape(shape).clone()
        opt.step()
        assert p.shape == shape
        assert _rel_diff([p.detach().reshape(ref[t][0].shape)], ref[t]) < 1e-9, t


def test_a_stacked_qkv_weight_under_muon_is_torch_muon_on_its_flattened_matrix():
    """torch.optim.Muon takes 2-D parameters only; kronopt views a 3-D one as ``(o, rest)`` (muon.md §6), not as a
    stack of ``d × d`` matrices (as modded-nanogpt's Muon does)."""
    gen = torch.Generator().manual_seed(6)
    qkv = torch.nn.Parameter(torch.randn(3, 8, 8, generator=gen))
    flat = torch.nn.Parameter(qkv.detach().reshape(3, 64).clone())
    with pytest.raises(ValueError):
        torch.optim.Muon([torch.nn.Parameter(torch.randn(3, 8, 8))])
    ours = kronopt.build([("blocks.0.attn.qkv", qkv)], "muon", lr=1e-3)
    ref = torch.optim.Muon([flat])
    for _ in range(8):
        g = torch.randn(3, 8, 8, generator=gen)
        qkv.grad, flat.grad = g.clone(), g.reshape(3, 64).clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(qkv.detach().reshape(3, 64), flat.detach(), rtol=2e-5, atol=2e-6)


# -- freezing, unfreezing, a new layer ---------------------------------------------------------------------------


def test_freezing_with_set_to_none_false_keeps_stepping_on_zero_gradients_as_torch_adamw():
    """``zero_grad(set_to_none=False)`` leaves a frozen layer with a zero gradient, which torch.optim.AdamW still
    steps (decay, and the moments keep moving it); a layer frozen before its first gradient has none. The
    same freeze with ``set_to_none=True`` stops it. kronopt does what torch does in both."""
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=F64), torch.nn.Tanh(), torch.nn.Linear(4, 3, dtype=F64))
    base[2].requires_grad_(False)  # frozen from the start, unfrozen at step 3
    xs = [torch.randn(5, 4, dtype=F64) for _ in range(12)]

    def run(make, set_to_none):
        model = copy.deepcopy(base)
        opt = make(model.parameters())
        for t, x in enumerate(xs):
            if t == 3:
                model[2].requires_grad_(True)
            if t == 6:
                model[0].requires_grad_(False)
            if t == 9:
                model[0].requires_grad_(True)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        return list(model.parameters())

    for set_to_none in (True, False):
        ours = run(lambda ps: kronopt.build(ps, "adamw", lr=1e-2, weight_decay=0.1), set_to_none)
        ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), set_to_none)
        assert _max_diff(ours, ref) == 0.0


def test_add_param_group_of_a_new_layer_mid_training_equals_torch_and_the_reference():
    """A layer added at step 4 with its own lr (progressive growing): adamw equals torch.optim.AdamW given the same
    group, and soap's new layer starts with its own first call (basis only), as the reference does."""
    gen = torch.Generator().manual_seed(13)
    shapes = [(5, 5), (5,), (4, 4), (4,)]
    init = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = reference_grads(gen, shapes, 12)
    for g in grads[4][2:]:  # the new layer's first gradient: a full-rank square block, nothing to fix
        assert g.ndim < 2 or torch.linalg.matrix_rank(g) == g.shape[0]

    def run(make, add):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps[:2])
        for t, row in enumerate(grads):
            if t == 4:
                add(opt, ps[2:])
            for i, (p, g) in enumerate(zip(ps, row)):
                p.grad = g.clone() if t >= 4 or i < 2 else None
            opt.step()
        return ps

    def add(opt, ps):
        opt.add_param_group({"params": ps, "lr": 3e-2})

    ours = run(lambda ps: kronopt.build(ps, "adamw", lr=1e-2), add)
    ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), add)
    assert _max_diff(ours, ref) == 0.0

    ours = run(lambda ps: kronopt.build(ps, "soap", lr=1e-2, **{"refresh.every": 3}), add)
    old = soap_reference(init[:2], [row[:2] for row in grads], lr=1e-2, precondition_frequency=3)
    new = soap_reference(init[2:], [row[2:] for row in grads[4:]], lr=3e-2, precondition_frequency=3)
    assert _rel_diff([p.detach() for p in ours], old[-1] + new[-1]) < 1e-9
    assert not torch.equal(ours[2].detach(), init[2])


# -- torch.compile(model) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon"])
def test_a_compiled_model_trains_as_the_eager_one(preset):
    """``torch.compile(model)`` (aot_eager: dynamo and AOT autograd, no C++ compiler) names its parameters
    ``_orig_mod.…``; the routing and every step must be those of the eager model."""
    torch.manual_seed(2)
    base = TiedLM(dtype=torch.float32)

    def run(compiled):
        model = copy.deepcopy(base)
        f = torch.compile(model, backend="aot_eager") if compiled else model
        opt = kronopt.build(list(f.named_parameters()), preset, lr=1e-2)
        routed = sorted(
            (n.removeprefix("_orig_mod."), g["pipeline"]) for g in opt.param_groups for n in g["param_names"]
        )
        _train_recording(f, opt, _batches(4, 8))
        return list(model.parameters()), routed

    (eager, r1), (compiled, r2) = run(False), run(True)
    assert r1 == r2
    assert _max_diff(eager, compiled) == 0.0


# -- a model cast or moved after the optimizer was built ----------------------------------------------------------


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo", "dykaf"])
def test_a_model_cast_after_the_optimizer_was_built_steps_as_one_built_after_the_cast(preset):
    """``opt = build(model.named_parameters()); model.double()`` before the first step, as torch.optim allows
    (its state is made at the first step, so it follows the parameters): the state is made again in float64
    at the first step, and the run equals, bit for bit, one whose optimizer was built after the cast (for
    adamw, torch.optim.AdamW's run in both orders). A cast after a step changes nothing kronopt made."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def train(net, opt, steps=8):
        for _ in range(steps):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    late = model()
    opt = kronopt.build(late.named_parameters(), preset)
    late.double()
    ours = train(late, opt)
    assert all(t.dtype == torch.float64 for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point())
    early = model().double()
    for a, b in zip(ours, train(early, kronopt.build(early.named_parameters(), preset))):
        assert torch.equal(a, b)
    if preset == "adamw":
        ref = model()
        topt = torch.optim.AdamW(ref.parameters(), lr=opt.config.lr, weight_decay=opt.config.weight_decay,
                                 betas=opt.config.inner.betas, eps=opt.config.inner.eps, fused=True)
        ref.double()
        for a, b in zip(ours, train(ref, topt)):
            assert torch.equal(a, b)
    # after a step the state is kronopt's to keep: a later cast does not make it again
    held = {k: v for k, v in opt.state[late[0].weight].items()}
    late.float()
    for p in late.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(opt.state[late[0].weight][k] is v for k, v in held.items() if torch.is_tensor(v))
