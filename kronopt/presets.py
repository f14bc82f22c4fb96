"""The built-in presets: each algorithm as one configuration of the pipeline.

Each constant equals the file of the same name in ``configs/`` (tested), and its
defaults equal its reference implementation's.
"""

from .bases import EighBasis, IdentityBasis, QrBasis
from .config import KronConfig, Route, Shapes
from .factors import EmaKronFactors, NoFactors
from .inner_rules import AdamInner, EigenvalueInner, OrthogonalizeInner
from .post import Post
from .refresh import EveryRefresh
from .splits import FullSplit

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
    lr=3e-3,
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
    lr=1e-3,
    weight_decay=0.0,
    factor_update="before",
    factors=EmaKronFactors(beta=0.95),
    basis=EighBasis(),
    inner=EigenvalueInner(momentum=0.95, exponent=-0.25, eps=1e-12, eps_placement="inside"),
    split=FullSplit(),
    refresh=EveryRefresh(every=10),
    post=Post(weight_decay_order="before", grafting="adam", graft_betas=(0.95, 0.95), graft_eps=1e-8),
    shapes=Shapes(max_dim=10000),
)

#: torch.optim.Muon for matrices; 0-D/1-D parameters, embeddings and heads go to AdamW.
MUON = KronConfig(
    lr=1e-3,
    weight_decay=0.1,
    factors=NoFactors(),
    basis=IdentityBasis(),
    inner=OrthogonalizeInner(),
    split=FullSplit(),
    refresh=EveryRefresh(every=1),
    post=Post(weight_decay_order="before"),
    route=Route(
        vectors="fallback",
        fallback_names=(r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|lm_head|head|output)(\.|$)",),
    ),
    fallback=KronConfig(
        lr=3e-4,
        weight_decay=0.0,
        factors=NoFactors(),
        basis=IdentityBasis(),
        inner=AdamInner(betas=(0.9, 0.95), eps=1e-10, eps_placement="after_correction"),
        split=FullSplit(),
        refresh=EveryRefresh(every=1),
        post=Post(weight_decay_order="before"),
    ),
)

PRESETS: dict[str, KronConfig] = {"adamw": ADAMW, "soap": SOAP, "shampoo": SHAMPOO, "muon": MUON}
