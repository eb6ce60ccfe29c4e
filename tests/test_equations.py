from helpers import golden_entries
import jax
import numpy as np
import pytest

from openpi_merge_plugin.lora import equations as eq


def test_lora_equations_match_the_ones_openpi_built_for_the_fixture():
    einsum_entries = [e for e in golden_entries() if e["module"] == "openpi.models.lora.Einsum"]
    assert len(einsum_entries) == 12
    for entry in einsum_entries:
        axes = tuple(entry["lora_config"]["axes"])
        assert (
            list(eq.make_lora_eqns(entry["equation"], axes, entry["lora_config"]["label"])) == entry["lora_equations"]
        )


@pytest.mark.parametrize("module", sorted(eq.MODULE_EQUATIONS))
def test_delta_equation_reproduces_the_two_step_lora_term(module):
    eqn = eq.MODULE_EQUATIONS[module]
    delta = eq.delta_equation(eqn)
    x_labels, w_labels, _ = eq.split_equation(eqn)
    sizes = {c: 3 + i for i, c in enumerate(sorted(set(x_labels + w_labels)))}
    sizes.update({"2": 2, "3": 3})
    rank = 2
    rng = np.random.default_rng(0)
    w_shape = [sizes[c] for c in w_labels]
    a_shape, b_shape = list(w_shape), list(w_shape)
    a_shape[-1] = rank
    b_shape[-2] = rank
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    x = rng.standard_normal([sizes[c] for c in x_labels])
    eqn_l, eqn_a, eqn_b = eq.to_letters(eqn, *delta.lora_equations)
    two_step = np.einsum(eqn_b, np.einsum(eqn_a, x, a), b)
    merged = np.einsum(eqn_l, x, np.einsum(delta.equation, a, b))
    np.testing.assert_allclose(merged, two_step, rtol=1e-10, atol=1e-10)


def test_attn_vec_delta_sums_lora_b_over_heads():
    # openpi's second LoRA equation for attn_vec_einsum contracts lora_b's head axis on its own.
    delta = eq.delta_equation("BTNH,NHD->BTD")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 16, 2)), rng.standard_normal((4, 2, 8))
    got = np.einsum(delta.equation, a, b)
    want = np.einsum("nhl,ld->nhd", a, b.sum(axis=0))
    per_head = np.einsum("nhl,nld->nhd", a, b)  # the textbook per-head product is NOT what openpi computes
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, per_head)


def test_label_already_in_equation_is_refused():
    with pytest.raises(eq.EquationError, match="L already in eqn"):
        eq.make_lora_eqns("BTL,LH->BTH")


def test_nonstandard_axes_follow_openpi():
    # LoRA over (N, D) of q_einsum's weight instead of (D, H).
    eqn_a, eqn_b = eq.make_lora_eqns("BTD,NDH->BTNH", axes=(0, 1))
    # openpi renames only the weight and output labels, so x's D is summed on its own: no weight can express that.
    assert (eqn_a, eqn_b) == ("BTD,NLH->BTNH", "BTNH,LDH->BTNH")
    with pytest.raises(eq.EquationError, match="'D'"):
        eq.delta_equation("BTD,NDH->BTNH", axes=(0, 1))


def test_digit_labels_become_letters_jax_accepts():
    delta = eq.delta_equation("BSD,2KDH->2BSKH")
    assert delta.equation.replace(",", "").replace("->", "").isalpha()
    out = jax.numpy.einsum(delta.equation, np.ones((2, 1, 4, 3)), np.ones((2, 1, 3, 5)))
    assert out.shape == (2, 1, 4, 5)
