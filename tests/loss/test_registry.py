"""The divergence registry: records, registration, lookup, and what config and evaluation read from it."""

import pytest
import torch

from distill.config import ObjectiveConfig, build_config
from distill.errors import ConfigError
from distill.eval.metrics import EVAL_DIVERGENCES
from distill.loss.divergences import forward_kl, sparse_divergence, sparse_per_token
from distill.loss.fused import fused_sparse_kd_loss
from distill.loss.registry import (
    DIVERGENCES,
    DivergenceParam,
    DivergenceSpec,
    eval_divergences,
    get_divergence,
    register_divergence,
    unregister_divergence,
)

BUILTINS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def test_builtins_in_order_with_their_parameters():
    assert list(DIVERGENCES)[: len(BUILTINS)] == BUILTINS
    assert get_divergence("jsd").params == (DivergenceParam("beta", 0.5, config_field="jsd_beta"),)
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        assert get_divergence(name).params == (DivergenceParam("alpha", 0.1, config_field="skew_alpha"),)
    assert all(not get_divergence(n).params for n in ("forward_kl", "reverse_kl", "tvd"))
    assert all(spec.sparse for spec in DIVERGENCES.values())


def test_eval_divergences_are_unchanged():
    """eval.json's keys and order: a new divergence flagged for evaluation changes them (on purpose)."""
    assert EVAL_DIVERGENCES == eval_divergences() == {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "tvd": {}}
    assert list(EVAL_DIVERGENCES) == ["forward_kl", "reverse_kl", "jsd", "tvd"]


def test_objective_divergence_params_come_from_the_registry():
    obj = ObjectiveConfig(jsd_beta=0.3, skew_alpha=0.2)
    for name, spec in DIVERGENCES.items():
        obj.divergence = name
        assert obj.divergence_params() == {p.name: getattr(obj, p.config_field) for p in spec.params}
    assert ObjectiveConfig(divergence="jsd", jsd_beta=0.3).divergence_params() == {"beta": 0.3}
    assert ObjectiveConfig(divergence="skew_reverse_kl").divergence_params() == {"alpha": 0.1}
    assert ObjectiveConfig(divergence="tvd").divergence_params() == {}


def test_unknown_names_list_the_choices_and_the_nearest():
    with pytest.raises(ValueError, match=r"unknown divergence 'fwd_kl' \(did you mean 'forward_kl'\?\); expected one of"):
        get_divergence("fwd_kl")
    tree = {"student": {"config": {"model_type": "llama"}}, "objective": {"alpha": 0.0, "divergence": "revers_kl"}}
    with pytest.raises(ConfigError) as err:
        build_config(tree)
    choices = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl' or 'tvd'"
    assert str(err.value) == f"config: 'objective.divergence': expected {choices}, got 'revers_kl' (did you mean 'reverse_kl'?)"


def _value(log_q, log_p):
    return forward_kl(log_q, log_p)


def _value_and_grad(log_q, log_p, temperature):
    return get_divergence("forward_kl").value_and_grad(log_q, log_p, temperature)


@pytest.fixture
def temporary():
    """Register records for one test; whatever it registered is removed afterwards."""
    added = []

    def add(spec):
        added.append(register_divergence(spec).name)
        return spec

    yield add
    for name in added:
        unregister_divergence(name)


def test_register_checks_the_record(temporary):
    with pytest.raises(ValueError, match="already registered"):
        register_divergence(DivergenceSpec("jsd", _value, _value_and_grad))
    with pytest.raises(ValueError, match="identifier-like"):
        register_divergence(DivergenceSpec("my kl", _value, _value_and_grad))
    with pytest.raises(ValueError, match="parameter names repeat"):
        p = DivergenceParam("beta", 0.5, "jsd_beta")
        register_divergence(DivergenceSpec("twice", _value, _value_and_grad, (p, p)))
    with pytest.raises(ValueError, match=r"default 2.0 is not in \[0.0, 1.0\]"):
        register_divergence(DivergenceSpec("bad", _value, _value_and_grad, (DivergenceParam("beta", 2.0, "jsd_beta"),)))
    with pytest.raises(ValueError, match="takes no parameter 'beta'"):
        register_divergence(DivergenceSpec("bad", _value, _value_and_grad, eval_params={"beta": 0.5}))
    assert "bad" not in DIVERGENCES and "twice" not in DIVERGENCES
    spec = temporary(DivergenceSpec("fkl_copy", _value, _value_and_grad, eval_params={}))
    with pytest.raises(TypeError):
        spec.eval_params["beta"] = 1.0  # records are read-only
    assert get_divergence("fkl_copy") is spec


def test_config_reads_the_registry_at_validation_time(temporary):
    obj = ObjectiveConfig()
    with pytest.raises(ValueError, match="got 'fkl_copy'"):
        obj.divergence = "fkl_copy"  # validate_assignment
    temporary(DivergenceSpec("fkl_copy", _value, _value_and_grad, (DivergenceParam("beta", 0.5, "jsd_beta"),)))
    obj.divergence = "fkl_copy"
    assert obj.divergence_params() == {"beta": 0.5}
    temporary(DivergenceSpec("orphan", _value, _value_and_grad, (DivergenceParam("gamma", 0.5, "no_such_field"),)))
    with pytest.raises(ValueError, match="objective.no_such_field, which does not exist"):
        ObjectiveConfig(divergence="orphan")


def test_a_divergence_without_a_sparse_form_is_refused_there(temporary):
    temporary(DivergenceSpec("dense_only", _value, _value_and_grad, sparse=False))
    g = torch.Generator().manual_seed(0)
    s, ids, logp = torch.randn(3, 7, generator=g), torch.tensor([[0, 1]] * 3), torch.full((3, 2), -1.0)
    mask = torch.ones(3, dtype=torch.bool)
    for call in (
        lambda: sparse_per_token("dense_only", s, ids, logp),
        lambda: sparse_divergence("dense_only", s, ids, logp, mask),
        lambda: fused_sparse_kd_loss(torch.randn(3, 4), torch.randn(7, 4), ids, logp, torch.full((3,), -1.0), mask,
                                     divergence="dense_only"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="'dense_only' has no top-k form"):
            call()


def test_unregister():
    with pytest.raises(ValueError, match="unknown divergence"):
        unregister_divergence("nope")
    spec = register_divergence(DivergenceSpec("fleeting", _value, _value_and_grad))
    assert unregister_divergence("fleeting") is spec and "fleeting" not in DIVERGENCES
    assert list(DIVERGENCES) == BUILTINS
