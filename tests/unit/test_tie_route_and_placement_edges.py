"""Edges of the config ties, the routed presets' name patterns and the state made again after a move or cast.

* a model cast after a ``step()`` that had no gradient at all gets its state made again in the new dtype, as
  torch.optim makes its state at the first step with gradients;
* an optimizer pickled before the placement record existed still adds a param group and steps;
* a state dict saved when the shampoo preset wrote its graft β₁ as 0.95 loads without a config warning under
  the tie, which binds to the same number;
* a restricted split is refused beside a refresh stage of any type that does not fire on the first call;
* adam's ``normalize`` on a restricted side with the default complement (``match_subspace_rms``) gives the
  whole step SOAP's ``normalize_grads`` RMS;
* the routed presets' embedding patterns leave hidden matrices of diffusion models (``time_emb_proj``,
  ``time_embedding.linear_1``) in the matrix pipeline.
"""

import copy
import math
import pickle
import warnings

import attrs
import pytest
import torch

import kronopt
from kronopt.registry import REFRESH
from kronopt.validators import ge, to_int

F64 = torch.float64


def _linear_pair():
    torch.manual_seed(0)
    ours = torch.nn.Linear(6, 5)
    theirs = torch.nn.Linear(6, 5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_a_model_cast_after_a_step_without_gradients_steps_as_torch_adamw_in_float64():
    """torch.optim makes a parameter's state at the first step that gives it a gradient; a ``step()`` before any
    ``backward()`` makes none. So after ``opt.step(); model.double()`` AdamW keeps float64 moments and the adamw
    preset must follow it to rounding (it does when the cast comes before any step)."""
    ours, theirs = _linear_pair()
    opt = kronopt.build(ours.parameters(), "adamw")
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=1e-2)
    opt.step()  # no gradient yet: nothing to do
    ref.step()
    ours.double()
    theirs.double()
    x = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    dtypes = {t.dtype for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()}
    assert dtypes == {F64}
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_an_optimizer_pickled_before_the_placement_record_adds_a_group_and_steps():
    """A copy whose pickled attributes lack ``_unstepped_placement`` (an optimizer saved with ``torch.save(opt)``
    by the release before it) must still take ``add_param_group`` and step, as ``step()`` itself does."""
    p = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)))
    opt = kronopt.build([p], "soap")
    state = opt.__getstate__()
    del state["_unstepped_placement"]
    old = kronopt.KronOptimizer.__new__(kronopt.KronOptimizer)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    q = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(3)))
    old.add_param_group({"params": [q]})
    for t in old.param_groups:
        for r in t["params"]:
            r.grad = torch.ones_like(r)
    old.step()
    assert len(old.param_groups) == 2


def test_a_shampoo_state_dict_with_the_graft_beta1_written_out_loads_without_a_config_warning():
    """Before 37689c3 the shampoo preset wrote ``post.graft_betas = [0.95, 0.95]``; it now ties β₁ to
    ``inner.momentum`` (0.95). Every number the step reads is the same, so resuming such a checkpoint with the
    preset must not warn that the state was saved under a different config (it does for a real difference)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=F64))
    opt = kronopt.build([p], "shampoo")
    for _ in range(3):
        p.grad = torch.randn(6, 5, generator=gen, dtype=F64)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["kronopt"]["config"]["post"]["graft_betas"] == ["momentum", 0.95]
    saved["kronopt"]["config"]["post"]["graft_betas"] = [0.95, 0.95]  # as the earlier release wrote it
    fresh = kronopt.build([torch.nn.Parameter(p.detach().clone())], "shampoo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(saved)


@attrs.frozen(kw_only=True)
class _NeverFirst:
    """Refresh every k updates, never on a parameter's first call."""

    every: int = attrs.field(default=10, converter=to_int, validator=ge(1))

    def due(self, step: int, *, first_call: bool) -> bool:
        return step > 0 and step % self.every == 0


def test_a_restricted_split_with_a_refresh_stage_that_skips_the_first_call_is_refused():
    """565e01d refuses ``refresh.at_first_call = false`` beside a restricted side; a refresh stage of another
    type with the same schedule (its ``due(0, first_call=True)`` is False) must be refused as well."""
    assert not _NeverFirst().due(0, first_call=True)
    restore = REFRESH.override("never_first_review", _NeverFirst)
    try:
        with pytest.raises(kronopt.ConfigError):
            kronopt.resolve("pro_soap", **{"refresh.type": "never_first_review", "refresh.every": 10})
    finally:
        restore()


def _step_rms_over_ct(preset, **overrides):
    """(step RMS / c_t) over 3 updates with ``inner.normalize`` on a 6 × 16 block, refreshed every update."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(6, 16, dtype=F64))
    b1, b2 = 0.9, 0.95
    opt = kronopt.build([p], preset, lr=1.0, weight_decay=0.0, **{
        "inner.normalize": True, "inner.betas": [b1, b2], "refresh.every": 1, **overrides,
    })
    p.grad = torch.randn(6, 16, generator=gen, dtype=F64)
    opt.step()  # the first call builds the basis and the subspace only
    out = []
    for t in range(1, 4):
        before = p.detach().clone()
        p.grad = torch.randn(6, 16, generator=gen, dtype=F64)
        opt.step()
        out.append((before - p.detach()).pow(2).mean().sqrt().item() / (math.sqrt(1 - b2**t) / (1 - b1**t)))
    return out


def test_soap_normalize_gives_every_step_the_rms_of_the_bias_correction_scale():
    """SOAP's ``normalize_grads`` (soap.md §6): the update divided by its RMS, then scaled by
    ``c_t = √(1−β₂ᵗ)/(1−β₁ᵗ)``: RMS c_t exactly (a hand count)."""
    assert _step_rms_over_ct("soap") == pytest.approx([1.0] * 3, rel=1e-12)


def test_pro_soap_normalize_gives_the_whole_step_soaps_normalize_grads_rms():
    """pro_soap with ``inner.normalize`` and its own complement (``match_subspace_rms`` × 1, right side rank 4 of
    16): the subspace block and the complement block are orthogonal, and the complement takes the subspace
    block's RMS per coordinate, so the whole step has SOAP's RMS c_t when the subspace block is normalised per
    subspace coordinate (as before d2245b4). Normalised over the 6 × 16 block instead, the step is √(16/4) = 2
    times that. Newton–Schulz in float64 keeps the two blocks orthogonal to rounding."""
    got = _step_rms_over_ct("pro_soap", **{"split.rank": 4, "split.side": "right", "split.ns_dtype": "float64"})
    assert got == pytest.approx([1.0] * 3, rel=1e-6)


#: hidden matrices (muon.md §7: only embeddings, the head, vectors and a ConvNet's first convolution go to AdamW)
#: whose module names contain an embedding word: diffusers' UNet (each ResNet block's time_emb_proj, the timestep
#: MLP time_embedding.linear_1/2) and DiT's timestep MLP
HIDDEN_NAMED_LIKE_EMBEDDINGS = [
    ("down_blocks.0.resnets.0.time_emb_proj.weight", (8, 12)),
    ("time_embedding.linear_1.weight", (12, 4)),
    ("time_embedding.linear_2.weight", (12, 12)),
    ("t_embedder.mlp.0.weight", (12, 4)),
]


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_hidden_matrices_of_diffusion_models_stay_in_the_matrix_pipeline(preset):
    params = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in HIDDEN_NAMED_LIKE_EMBEDDINGS]
    opt = kronopt.build(params, preset)
    routed = {n: g["pipeline"] for g in opt.param_groups for n in g["param_names"]}
    assert routed == {n: "main" for n, _ in HIDDEN_NAMED_LIKE_EMBEDDINGS}
