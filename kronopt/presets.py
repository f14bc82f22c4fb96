"""The built-in presets: each algorithm as one configuration of the pipeline.

Each constant equals the file of the same name in ``configs/`` (tested), and its
defaults equal its reference implementation's.
"""

import attrs

from .bases import EighBasis, IdentityBasis, QrBasis
from .config import KronConfig, Route, Shapes
from .factors import EmaKronFactors, KlKronFactors, NoFactors, ProjectorSplittingFactors
from .inner_rules import AdamInner, AdamRank1Inner, EigenvalueInner, OrthogonalizeInner
from .post import Post
from .refresh import EveryRefresh
from .splits import FullSplit, LowRankFlatSplit

#: parameter names the routed presets send to their fallback: embeddings and output heads
AUX_NAMES: tuple[str, ...] = (
    # an embedding: a path part that starts with embed (embeddings, embed_tokens, embed_in/out), wte or wpe ...
    r"(^|\.)(embed\w*|wte|wpe)(\.|$)",
    # ... or a prefixed name (word_embeddings, tok_emb, pos_emb, value_embeds.0) as the module that holds the
    # parameter, or the parameter itself: not a module that holds layers (diffusers' time_embedding.linear_1,
    # time_emb_proj: hidden matrices)
    r"(^|\.)\w+_(embed\w*|emb|wte|wpe)(\.\d+)?(\.\w+)?$",
    r"(^|\.)(lm_head|head)(\.|$)",
    # ``output`` only as the module holding the parameter (Llama's head), not BERT's ``attention.output.dense``
    r"(^|\.)output(\.(weight|bias))?$",
)


def _adamw_fallback(*, lr: float, betas: tuple[float, float], eps: float) -> KronConfig:
    """torch.optim.AdamW semantics, no weight decay: the fallback of the routed presets."""
    return KronConfig(
        lr=lr,
        weight_decay=0.0,
        factors=NoFactors(),
        basis=IdentityBasis(),
        inner=AdamInner(betas=betas, eps=eps, eps_placement="after_correction"),
        split=FullSplit(),
        refresh=EveryRefresh(every=1),
        post=Post(weight_decay_order="before"),
    )


#: torch.optim.AdamW, exactly (its defaults and conventions).
ADAMW = KronConfig(
    lr=1e-3,
    weight_decay=1e-2,
    factors=NoFactors(),
    basis=IdentityBasis(),
    inner=AdamInner(betas=(0.9, 0.999), eps=1e-8, eps_placement="after_correction"),
    split=FullSplit(),
    refresh=EveryRefresh(every=1),
    post=Post(weight_decay_order="before"),
)

#: SOAP, nikhilvyas/SOAP @a1e5535 with its constructor defaults.
SOAP = KronConfig(
    lr=1e-2,  # tuned on the embedded task (docs/configs.md); the reference's default is 3e-3
    weight_decay=1e-2,
    skip_first_call=True,
    factor_update="after",
    factors=EmaKronFactors(beta=0.95),
    basis=QrBasis(),
    inner=AdamInner(betas=(0.95, 0.95), eps=1e-8, eps_placement="before_correction"),
    split=FullSplit(),
    refresh=EveryRefresh(every=10, at_first_call=True),
    post=Post(weight_decay_order="after"),
    shapes=Shapes(max_dim=10000),
)

#: Shampoo (−1/4 per side) with layer-wise Adam grafting, Distributed-Shampoo style.
SHAMPOO = KronConfig(
    lr=1e-2,  # tuned (docs/configs.md)
    weight_decay=0.0,
    factor_update="before",
    factors=EmaKronFactors(beta=0.95),
    basis=EighBasis(),
    inner=EigenvalueInner(momentum=0.95, exponent=-0.25, eps=1e-12, eps_placement="inside"),
    split=FullSplit(),
    refresh=EveryRefresh(every=10),
    post=Post(weight_decay_order="before", grafting="adam", graft_betas=("momentum", 0.95), graft_eps=1e-8),
    shapes=Shapes(max_dim=10000),
)

#: torch.optim.Muon for matrices; 0-D/1-D parameters, embeddings and heads go to AdamW.
MUON = KronConfig(
    lr=3e-2,  # tuned (docs/configs.md); torch.optim.Muon's default is 1e-3
    weight_decay=0.1,
    factors=NoFactors(),
    basis=IdentityBasis(),
    inner=OrthogonalizeInner(),
    split=FullSplit(),
    refresh=EveryRefresh(every=1),
    post=Post(weight_decay_order="before"),
    route=Route(
        vectors="fallback",
        fallback_names=AUX_NAMES,
    ),
    fallback=_adamw_fallback(lr=9e-3, betas=(0.9, 0.95), eps=1e-10),
)

#: DyKAF (Yudin et al. 2025): SOAP whose factors track the nearest Kronecker product of the
#: Fisher EMA by projector splitting (KSL, EMA-consistent kron start); dykaf spec §11.
DYKAF = KronConfig(
    lr=1e-2,  # tuned (docs/configs.md); SOAP's default is 3e-3
    weight_decay=1e-2,
    skip_first_call=True,
    factor_update="after",
    factors=ProjectorSplittingFactors(beta=0.95, variant="ksl", init="kron"),
    basis=QrBasis(),
    inner=AdamInner(betas=(0.95, 0.95), eps=1e-8, eps_placement="before_correction"),
    split=FullSplit(),
    refresh=EveryRefresh(every=10, at_first_call=True),
    post=Post(weight_decay_order="after"),
    shapes=Shapes(max_dim=10000),
)

#: DyKAF with the rank-1 second moment l rᵀ (dykaf spec §7).
DYKAF_RANK1 = attrs.evolve(
    DYKAF, lr=5e-3, inner=AdamRank1Inner(betas=(0.95, 0.95), eps=1e-8, eps_placement="before_correction")
)

#: AdamW for what KL-Shampoo does not precondition (kl_shampoo.md §8): 1-D, embeddings, head. Its lr
#: equals the main one, as in the reference (tuned together: docs/configs.md).
_KL_FALLBACK = _adamw_fallback(lr=0.1, betas=(0.9, 0.98), eps=1e-8)

#: KL-Shampoo (Lin et al. 2025), yorkerlin/KL-Methods optim/kl_opt.py KLOpt defaults, float32 state.
KL_SHAMPOO = KronConfig(
    lr=0.1,  # tuned (docs/configs.md); the reference's default is 1e-4
    weight_decay=0.01,
    skip_first_call=True,
    factor_update="after",
    factors=KlKronFactors(beta=0.98, init_factor=0.1, damping=0.0, clamping=True, max_clamp=4000.0),
    basis=QrBasis(sort=False),
    # the momentum kept in the eigenbasis: the same direction, and the factor update's rotation of G serves it
    inner=EigenvalueInner(
        momentum=0.9, exponent=-0.5, eps=1e-8, eps_placement="product", bias_correction=False, momentum_basis="eigen"
    ),
    split=FullSplit(),
    refresh=EveryRefresh(every=10, at_first_call=True),
    post=Post(weight_decay_order="after"),
    shapes=Shapes(max_dim=10000),
    route=Route(vectors="fallback", fallback_names=AUX_NAMES),
    fallback=_KL_FALLBACK,
)

#: KL-SOAP: KL-Shampoo's factors and basis, Adam (no bias correction) in the basis (kl_shampoo.md §7).
KL_SOAP = attrs.evolve(
    KL_SHAMPOO,
    lr=3e-3,  # tuned (docs/configs.md); the reference's default is 1e-4
    fallback=attrs.evolve(_KL_FALLBACK, lr=3e-3),
    inner=AdamInner(betas=(0.9, 0.98), eps=1e-8, eps_placement="before_correction", bias_correction=False),
)

#: Pro-KLShampoo (reconstructed, docs/kl.md): KL-Shampoo with the larger side kept as rank
#: min(128, d/4) + one flat eigenvalue and an orthogonalized complement.
PRO_KL_SHAMPOO = attrs.evolve(
    KL_SHAMPOO,
    inner=attrs.evolve(KL_SHAMPOO.inner, momentum_basis="subspace"),  # the momentum split against the subspace
    split=LowRankFlatSplit(rank=0.25, max_rank=128, side="larger", complement_scale="whitened", complement_mult=1.0),
)

#: Pro-SOAP (new, docs/pro.md): SOAP with the larger side kept as rank min(128, d/4) + one flat
#: eigenvalue (the EMA's projection), Adam in the rotated m × r block, and the complement of the
#: momentum orthogonalized at the subspace block's RMS.
PRO_SOAP = attrs.evolve(
    SOAP,
    split=LowRankFlatSplit(
        rank=0.25, max_rank=128, side="larger", complement_scale="match_subspace_rms", complement_mult=1.0
    ),
)

#: Pro-DyKAF (new, docs/pro.md): DyKAF (projector-splitting factors) with pro_soap's low-rank + flat
#: larger side, Adam in the rotated m × r block and the orthogonalized complement.
PRO_DYKAF = attrs.evolve(DYKAF, split=PRO_SOAP.split)

PRESETS: dict[str, KronConfig] = {
    "adamw": ADAMW,
    "soap": SOAP,
    "shampoo": SHAMPOO,
    "muon": MUON,
    "dykaf": DYKAF,
    "dykaf_rank1": DYKAF_RANK1,
    "kl_shampoo": KL_SHAMPOO,
    "kl_soap": KL_SOAP,
    "pro_kl_shampoo": PRO_KL_SHAMPOO,
    "pro_soap": PRO_SOAP,
    "pro_dykaf": PRO_DYKAF,
}
