"""The stage contract, over every registered key of every slot (plugins included).

Each entry must: have a default instance; be frozen and hashable; satisfy its
slot's Protocol; survive a TOML round trip inside a config; keep the shape,
dtype and device of everything it keeps across calls; and stay finite on every
gradient family of :mod:`tests.strategies`. A plugin is supported only if it
passes (STYLE.md §2.7).
"""

import contextlib
import itertools
import zlib

import attrs
import pytest
import torch
from hypothesis import given, settings

import kronopt
from kronopt import compose, types
from kronopt.refresh import EveryRefresh
from kronopt.registry import SLOTS
from kronopt.types import CONTRACTS, capabilities, protocol_members
from tests.strategies import FAMILY_SHAPES, GRADIENT_FAMILIES, SEEDS, generator, gradient, randn

PROTOCOLS = {
    "factors": types.FactorEstimator,
    "basis": types.Basis,
    "inner": types.InnerRule,
    "split": types.Split,
    "refresh": types.Refresh,
}

#: (slot, key) of every registered stage, plugins loaded, collected at import time
ENTRIES = [
    pytest.param(slot, entry.key, id=f"{slot}-{entry.key}")
    for slot, registry in SLOTS.items()
    for entry in registry.entries()
]

LAYOUTS = [("full", "full"), ("full", "none"), ("none", "none")]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_every_slot_has_a_protocol():
    assert set(PROTOCOLS) == set(SLOTS) == set(CONTRACTS)
    assert all(CONTRACTS[slot].protocol is PROTOCOLS[slot] for slot in SLOTS)


def _cls(slot, key):
    return SLOTS[slot].get(key)


def _first_field(cls):
    fields = [f for f in attrs.fields(cls) if f.init]
    return fields[0].name if fields else None


# -- configs with compatible companions -------------------------------------------------------------


def _preferred_dict(slot, key):
    """The soap preset with ``slot`` replaced by ``{"type": key}`` and the companions it needs."""
    raw = kronopt.to_dict(kronopt.PRESETS["soap"])
    raw[slot] = {"type": key}
    caps = capabilities(_cls(slot, key)) if slot != "refresh" else None
    if slot == "inner" and caps.needs_eigvals:
        raw["basis"] = {"type": "eigh"}
        raw["factors"] = {"type": "ema"}
    if slot == "basis" and caps.needs_factors:
        raw["factors"] = {"type": "ema"}
    if slot == "factors" and not caps.provides_factors:
        raw["basis"] = {"type": "identity"}
    if slot == "split" and caps.restricts:
        # a restricted side needs stages that support it (config._check_compatible): pick the
        # built-in ones that do, preferring the preset that uses such a split (pro_kl_shampoo)
        for companion in ("factors", "basis", "inner"):
            able = [e.key for e in SLOTS[companion].entries(load_plugins=False) if capabilities(e.cls).supports_restricted]
            if able and not capabilities(_cls(companion, raw[companion]["type"])).supports_restricted:
                raw[companion] = {"type": able[0]}
    return raw


def config_for(slot, key):
    """A valid config using ``slot = key`` (default instance), or skip if no companions fit."""
    raw = _preferred_dict(slot, key)
    try:
        return kronopt.from_dict(raw).bound()
    except kronopt.ConfigError as first:
        others = [s for s in SLOTS if s != slot]
        for combo in itertools.product(*(SLOTS[s].keys() for s in others)):
            attempt = dict(raw)
            attempt.update({s: {"type": k} for s, k in zip(others, combo)})
            try:
                return kronopt.from_dict(attempt).bound()
            except kronopt.ConfigError:
                continue
        pytest.skip(f"{slot} stage {key!r} fits no combination of the registered stages: {first}")


def pipeline_for(slot, key):
    """The config of :func:`config_for`, touching W from the first call and refreshing every call."""
    cfg = attrs.evolve(config_for(slot, key), skip_first_call=False)
    if slot != "refresh":
        cfg = attrs.evolve(cfg, refresh=EveryRefresh(every=1, at_first_call=True))
    return cfg


# -- static contract --------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot,key", ENTRIES)
def test_default_instance_constructible(slot, key):
    cls = _cls(slot, key)
    inst = cls()
    assert type(inst) is cls
    assert SLOTS[slot].key_of(cls) == key


@pytest.mark.parametrize("slot,key", ENTRIES)
def test_frozen_and_hashable(slot, key):
    cls = _cls(slot, key)
    assert attrs.has(cls), f"{slot} stage {key!r} is not an attrs class"
    inst = cls()
    name = _first_field(cls) or "probe"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(inst, name, getattr(inst, name, None))
    assert hash(inst) == hash(cls())
    assert inst == cls()
    assert len({inst, cls()}) == 1


@pytest.mark.parametrize("slot,key", ENTRIES)
def test_satisfies_slot_protocol(slot, key):
    inst = _cls(slot, key)()
    assert isinstance(inst, PROTOCOLS[slot])
    if slot == "split" and hasattr(inst, "sides"):
        for rotated in itertools.product((True, False), repeat=2):
            sides = inst.sides(6, 4, rotated)
            assert len(sides) == 2, sides
            for (kind, rank), on in zip(sides, rotated):
                assert kind in types.SIDE_KINDS and isinstance(rank, int) and rank >= 0, sides
                if not on:
                    assert kind == "none", f"a side the shape policy does not rotate became {kind!r}"
    elif slot == "split":
        assert inst.side_kind(True) in types.SIDE_KINDS and inst.side_kind(False) == "none"
    if slot == "refresh":
        for t in range(0, 25):
            assert isinstance(inst.due(t, first_call=t == 0), bool)


@pytest.mark.parametrize("slot,key", ENTRIES)
def test_capabilities_are_typed_and_backed_by_their_members(slot, key):
    """The stage's capabilities are its slot's record; each declared one has its members, and each
    optional member present is claimed by a declared capability (else the core would never call it)."""
    cls = _cls(slot, key)
    record_type = CONTRACTS[slot].capabilities
    if record_type is None:
        return
    caps = capabilities(cls)
    assert type(caps) is record_type, f"{slot} stage {key!r} declares {type(caps).__name__}, not {record_type.__name__}"
    inst = cls()
    claimed = set(protocol_members(PROTOCOLS[slot]))
    optional = {}
    for field in attrs.fields(record_type):
        proto = field.metadata["protocol"]
        if proto is None:
            continue
        optional.update({m: field.name for m in protocol_members(proto)})
        if getattr(caps, field.name):
            assert isinstance(inst, proto), f"{slot} stage {key!r} declares {field.name} but is not a {proto.__name__}"
            claimed.update(protocol_members(proto))
    for member, cap in optional.items():
        if member not in claimed:
            assert not hasattr(cls, member), f"{slot} stage {key!r} defines {member}() without declaring {cap}"


@pytest.mark.parametrize("slot,key", ENTRIES)
def test_toml_round_trip(slot, key):
    cfg = config_for(slot, key)
    assert getattr(cfg, slot) == _cls(slot, key)()
    text = kronopt.dumps(cfg)
    assert kronopt.loads(text) == cfg
    assert kronopt.dumps(kronopt.loads(text)) == text


# -- dynamic contract --------------------------------------------------------------------------------------


def _tensors(state):
    return {path: value for path, value in compose.flatten(state).items()}


def _check_same_structure(before, after, where):
    assert before.keys() == after.keys(), f"{where}: state keys changed"
    for path, old in before.items():
        new = after[path]
        if isinstance(old, torch.Tensor):
            assert isinstance(new, torch.Tensor), f"{where}: {path} is no longer a tensor"
            assert new.shape == old.shape, f"{where}: {path} shape {tuple(old.shape)} -> {tuple(new.shape)}"
            assert new.dtype == old.dtype, f"{where}: {path} dtype {old.dtype} -> {new.dtype}"
            assert new.device == old.device, f"{where}: {path} device {old.device} -> {new.device}"
        else:
            assert (old is None) == (new is None), f"{where}: {path} went from {old!r} to {new!r}"


def _check_sides(cfg, layout, state, dtype, device):
    b, m, n = layout.batch, layout.m, layout.n
    L, R = cfg.factors.factors(state.factors)
    Q_L, Q_R = state.basis.Q_L, state.basis.Q_R
    for side, X, Q, d in (("left", L, Q_L, m), ("right", R, Q_R, n)):
        kind = getattr(layout, side)
        for name, T in (("factor", X), ("basis", Q)):
            if kind == "none":
                assert T is None, f"{side} side is 'none' but the {name} is kept"
            elif T is not None:
                assert T.shape == (b, d, d) and T.dtype == dtype and T.device == device, (name, side, T.shape, T.dtype)


def _snapshot(state):
    return {k: v.clone() for k, v in compose.flatten(state).items() if isinstance(v, torch.Tensor)}


def _check_unchanged(before, state, where):
    """A stage's methods are pure: the state a call started from is left as it was."""
    for path, value in compose.flatten(state).items():
        if path in before:
            assert torch.equal(before[path], value), f"{where}: the step changed the old state {path} in place"


def _check_symmetric_factors(cfg, layout, state, where):
    if not capabilities(cfg.factors).provides_factors:
        return
    for side, X in zip(("left", "right"), cfg.factors.factors(state.factors)):
        if getattr(layout, side) == "full" and X is not None:
            assert torch.equal(X, X.mT), f"{where}: the {side} factor is not exactly symmetric"


@contextlib.contextmanager
def _no_host_reads():
    """Nothing in a step reads tensor values on the host (tests/unit/test_no_host_sync.py, for every stage)."""
    from kronopt import linalg

    def boom(*args, **kwargs):
        raise AssertionError("a stage read a tensor value on the host (.item(), bool(), float(), .tolist()) inside the step")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")}
    verdicts = linalg._CPU_HOST_VERDICTS
    linalg._CPU_HOST_VERDICTS = False
    try:
        for name in saved:
            setattr(torch.Tensor, name, boom)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        linalg._CPU_HOST_VERDICTS = verdicts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("left,right", LAYOUTS)
@pytest.mark.parametrize("slot,key", ENTRIES)
def test_init_and_update_keep_shape_dtype_device(slot, key, left, right, dtype, device):
    device = torch.empty(0, device=device).device  # "cuda" → "cuda:0", as the tensors report it
    cfg = pipeline_for(slot, key)
    b, m, n = 2, 5, 3
    layout = types.Layout(batch=b, m=m, n=n, left=left, right=right)
    state = compose.init_state(cfg, layout, dtype=dtype, device=device)
    first = _tensors(state)
    _check_sides(cfg, layout, state, dtype, device)
    gen = generator(zlib.crc32(f"{slot}/{key}/{left}/{right}".encode()))
    for call in range(4):
        G = randn(gen, b, m, n, dtype=dtype).to(device)
        G_seen, old = G.clone(), _snapshot(state)
        with _no_host_reads():
            D, new = compose.step(cfg, layout, state, G)
        assert D is not None
        assert D.shape == (b, m, n) and D.dtype == dtype and D.device == device, (
            f"call {call}: the direction has shape {tuple(D.shape)}, dtype {D.dtype}, device {D.device}; "
            f"expected {(b, m, n)}, {dtype}, {device}"
        )
        assert torch.equal(G, G_seen), f"call {call}: the step changed its gradient G in place"
        _check_unchanged(old, state, f"call {call}")
        state = new
        _check_same_structure(first, _tensors(state), f"call {call}")
        _check_sides(cfg, layout, state, dtype, device)
        _check_symmetric_factors(cfg, layout, state, f"call {call}")
    assert state.step == 4 and state.calls == 4


@pytest.mark.parametrize("left,right", [("full", "full"), ("none", "none")])
@pytest.mark.parametrize("slot,key", ENTRIES)
def test_a_bucket_equals_its_blocks_run_alone(slot, key, left, right):
    """Batching changes nothing (docs/extending.md §3): each block of a bucket of 3 gets the direction it gets
    in a bucket of its own, in float64 (square full-rank blocks: no degenerate eigenspace makes the basis
    arbitrary)."""
    cfg = pipeline_for(slot, key)
    b, d = 3, 4
    layout = types.Layout(batch=b, m=d, n=d, left=left, right=right)
    one = attrs.evolve(layout, batch=1)
    kw = {"dtype": torch.float64, "device": torch.device("cpu")}
    state = compose.init_state(cfg, layout, **kw)
    singles = [compose.init_state(cfg, one, **kw) for _ in range(b)]
    gen = generator(zlib.crc32(f"batch/{slot}/{key}/{left}".encode()))
    for call in range(4):
        G = randn(gen, b, d, d, dtype=torch.float64)
        D, state = compose.step(cfg, layout, state, G)
        for i in range(b):
            D_i, singles[i] = compose.step(cfg, one, singles[i], G[i : i + 1].clone())
            torch.testing.assert_close(
                D_i[0], D[i], rtol=1e-8, atol=1e-10,
                msg=lambda msg, i=i, call=call: f"call {call}: block {i} of a bucket differs from the block run alone: {msg}",
            )


def _finite_state(state):
    for path, value in compose.flatten(state).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"state {path} is not finite"


@pytest.mark.parametrize("family", GRADIENT_FAMILIES)
@pytest.mark.parametrize("slot,key", ENTRIES)
@settings(max_examples=3)
@given(seed=SEEDS)
def test_finite_on_gradient_families(slot, key, family, seed):
    cfg = pipeline_for(slot, key)
    m, n = FAMILY_SHAPES[family]
    layout = types.Layout(batch=2, m=m, n=n, left="full", right="full")
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    gen = generator(seed)
    for call in range(4):
        G = gradient(family, gen, batch=2, dtype=torch.float32)
        D, state = compose.step(cfg, layout, state, G)
        assert D.shape == G.shape
        assert torch.isfinite(D).all(), f"{family} gradient, call {call}: direction not finite"
        _finite_state(state)


# -- restricted sides ----------------------------------------------------------------------------------------

#: stages that declare they hold or make a restricted (low-rank + flat) side
RESTRICTED_ENTRIES = [
    pytest.param(slot, entry.key, id=f"{slot}-{entry.key}")
    for slot, registry in SLOTS.items()
    for entry in registry.entries()
    if slot != "refresh" and (
        capabilities(entry.cls).restricts if slot == "split" else capabilities(entry.cls).supports_restricted
    )
]


def test_some_stages_declare_restricted_sides():
    keys = {p.values for p in RESTRICTED_ENTRIES}
    assert {("factors", "kl"), ("basis", "qr"), ("inner", "eigenvalue"), ("split", "lowrank_flat")} <= keys


def restricted_pipeline_for(slot, key):
    """The pro_kl_shampoo preset (whose companions hold a restricted side) with ``slot = key``."""
    raw = kronopt.to_dict(kronopt.PRESETS["pro_kl_shampoo"])
    raw[slot] = {"type": key}
    try:
        cfg = kronopt.from_dict(raw).bound()
    except kronopt.ConfigError as err:
        pytest.fail(f"{slot} stage {key!r} declares restricted support but does not fit pro_kl_shampoo: {err}")
    return attrs.evolve(cfg, skip_first_call=False, refresh=EveryRefresh(every=1, at_first_call=True))


def _restricted_layout(cfg, b, m, n):
    split = cfg.split if capabilities(cfg.split).restricts else kronopt.PRESETS["pro_kl_shampoo"].split
    (kl, rl), (kr, rr) = split.sides(m, n, (True, True))
    layout = types.Layout(batch=b, m=m, n=n, left=kl, right=kr, rank_left=rl, rank_right=rr)
    assert "restricted" in (kl, kr), (m, n, layout)
    return layout


def _check_restricted_sides(cfg, layout, state, dtype, device):
    b = layout.batch
    P_L, P_R = cfg.factors.factors(state.factors)
    for side, X, Q, d, r in (
        ("left", P_L, state.basis.Q_L, layout.m, layout.rank_left),
        ("right", P_R, state.basis.Q_R, layout.n, layout.rank_right),
    ):
        cols = r if getattr(layout, side) == "restricted" else d
        for name, T in (("factor", X), ("basis", Q)):
            assert T is not None, f"{side} {name} missing"
            assert T.shape == (b, d, cols) and T.dtype == dtype and T.device == device, (name, side, T.shape, T.dtype)
    for side, Q, r in (("left", state.basis.Q_L, layout.rank_left), ("right", state.basis.Q_R, layout.rank_right)):
        if getattr(layout, side) == "restricted":  # the subspace stays orthonormal
            torch.testing.assert_close(Q.mT @ Q, torch.eye(r, dtype=dtype).expand(b, -1, -1), rtol=0, atol=1e-4)
    # the rest of the restricted-side protocol (docs/extending.md): r eigenvalue estimates per
    # restricted side from the basis and in ctx.eigvals, and one flat eigenvalue per block in ctx.flat
    ctx = compose.context(cfg, layout, state, state.step)
    sides = (("left", 0, state.basis.lam_L, layout.rank_left), ("right", 1, state.basis.lam_R, layout.rank_right))
    for side, i, lam, r in sides:
        if getattr(layout, side) != "restricted":
            assert ctx.flat[i] is None, f"{side} side is not restricted but ctx.flat holds a value"
            continue
        assert lam is not None and lam.shape == (b, r), (side, None if lam is None else lam.shape)
        assert ctx.eigvals[i] is not None and ctx.eigvals[i].shape == (b, r), side
        assert ctx.flat[i] is not None and ctx.flat[i].shape == (b,) and ctx.flat[i].dtype == dtype, side


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m,n", [(5, 8), (8, 5)])
@pytest.mark.parametrize("slot,key", RESTRICTED_ENTRIES)
def test_restricted_init_and_update_keep_shape_dtype_device(slot, key, m, n, dtype):
    device = torch.device("cpu")
    cfg = restricted_pipeline_for(slot, key)
    b = 2
    layout = _restricted_layout(cfg, b, m, n)
    state = compose.init_state(cfg, layout, dtype=dtype, device=device)
    first = _tensors(state)
    gen = generator(zlib.crc32(f"restricted/{slot}/{key}/{m}/{n}".encode()))
    for call in range(4):
        G = randn(gen, b, m, n, dtype=dtype).to(device)
        D, state = compose.step(cfg, layout, state, G)
        assert D is not None
        assert D.shape == (b, m, n) and D.dtype == dtype and D.device == device, (call, D.shape, D.dtype, D.device)
        assert torch.isfinite(D).all()
        _check_same_structure(first, _tensors(state), f"call {call}")
        _check_restricted_sides(cfg, layout, state, dtype, device)
    assert state.step == 4 and state.calls == 4


@pytest.mark.parametrize("family", GRADIENT_FAMILIES)
@pytest.mark.parametrize("slot,key", RESTRICTED_ENTRIES)
@settings(max_examples=3)
@given(seed=SEEDS)
def test_restricted_finite_on_gradient_families(slot, key, family, seed):
    cfg = restricted_pipeline_for(slot, key)
    m, n = FAMILY_SHAPES[family]
    layout = _restricted_layout(cfg, 2, m, n)
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    gen = generator(seed)
    for call in range(4):
        G = gradient(family, gen, batch=2, dtype=torch.float32)
        D, state = compose.step(cfg, layout, state, G)
        assert D.shape == G.shape
        assert torch.isfinite(D).all(), f"{family} gradient, call {call}: direction not finite"
        _finite_state(state)
