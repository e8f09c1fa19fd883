"""Optimizers: each step against the update formulas written out directly."""

import numpy as np
import pytest

from miniattn.nn import SGD, Adam, clip_grad_norm


def make_problem(rng):
    params = {"layer.weight": rng.standard_normal((3, 2)), "layer.bias": rng.standard_normal(2)}
    grads_per_step = [
        {name: rng.standard_normal(value.shape) for name, value in params.items()} for _ in range(3)
    ]
    return params, grads_per_step


def test_sgd_plain_step(rng):
    params, grads_per_step = make_problem(rng)
    start = {name: value.copy() for name, value in params.items()}
    weight = params["layer.weight"]
    SGD(0.1).step(params, grads_per_step[0])
    assert params["layer.weight"] is weight  # updated in place
    for name in params:
        np.testing.assert_allclose(params[name], start[name] - 0.1 * grads_per_step[0][name], rtol=1e-15)


def test_sgd_momentum_and_weight_decay_over_three_steps(rng):
    params, grads_per_step = make_problem(rng)
    expected = {name: value.copy() for name, value in params.items()}
    velocity = {name: np.zeros_like(value) for name, value in params.items()}
    optimizer = SGD(0.05, momentum=0.9, weight_decay=0.01)
    for grads in grads_per_step:
        optimizer.step(params, grads)
        for name in expected:
            g = grads[name] + 0.01 * expected[name]
            velocity[name] = 0.9 * velocity[name] + g
            expected[name] = expected[name] - 0.05 * velocity[name]
    for name in params:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-13)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_the_formulas_over_three_steps(rng, weight_decay):
    params, grads_per_step = make_problem(rng)
    expected = {name: value.copy() for name, value in params.items()}
    m = {name: np.zeros_like(value) for name, value in params.items()}
    v = {name: np.zeros_like(value) for name, value in params.items()}
    lr, beta1, beta2, eps = 0.01, 0.8, 0.99, 1e-7
    optimizer = Adam(lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    for t, grads in enumerate(grads_per_step, start=1):
        optimizer.step(params, grads)
        for name in expected:
            g = grads[name]
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g**2
            m_hat = m[name] / (1 - beta1**t)
            v_hat = v[name] / (1 - beta2**t)
            decay = weight_decay if name == "layer.weight" else 0.0  # matrices only
            expected[name] = expected[name] - lr * decay * expected[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
    for name in params:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-13)


def test_adam_first_step_moves_each_entry_by_lr(rng):
    params, grads_per_step = make_problem(rng)
    start = {name: value.copy() for name, value in params.items()}
    Adam(0.01, eps=1e-12).step(params, grads_per_step[0])
    for name in params:
        # Bias correction makes the first step lr * sign(g).
        np.testing.assert_allclose(start[name] - params[name], 0.01 * np.sign(grads_per_step[0][name]), rtol=1e-9)


def test_adam_reduces_a_quadratic(rng):
    target = rng.standard_normal(5)
    params = {"x": np.zeros(5)}
    optimizer = Adam(0.1)
    for _ in range(200):
        optimizer.step(params, {"x": 2 * (params["x"] - target)})
    np.testing.assert_allclose(params["x"], target, atol=1e-2)


def test_adam_keeps_float32(rng):
    params = {"w": rng.standard_normal((3, 3)).astype(np.float32)}
    Adam(0.01, weight_decay=0.1).step(params, {"w": np.ones((3, 3), dtype=np.float32)})
    assert params["w"].dtype == np.float32


def test_optimizer_state_dict_round_trip(rng):
    params, grads_per_step = make_problem(rng)
    twin = {name: value.copy() for name, value in params.items()}
    first = Adam(0.01, weight_decay=0.1)
    first.step(params, grads_per_step[0])
    first.step(params, grads_per_step[1])

    second = Adam(0.01, weight_decay=0.1)
    second.step(twin, grads_per_step[0])
    second.step(twin, grads_per_step[1])
    restored = Adam(0.01, weight_decay=0.1)
    restored.load_state_dict(second.state_dict())
    first.step(params, grads_per_step[2])
    restored.step(twin, grads_per_step[2])
    for name in params:
        np.testing.assert_array_equal(params[name], twin[name])
    assert set(second.state_dict()) == {"step", "m/layer.weight", "m/layer.bias", "v/layer.weight", "v/layer.bias"}


def test_clip_grad_norm(rng):
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.sqrt(sum(np.sum(g**2) for g in grads.values())), 1.0, rtol=1e-9)
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])


def test_optimizers_reject_bad_options():
    with pytest.raises(ValueError, match="lr=0"):
        SGD(0)
    with pytest.raises(ValueError, match="momentum=1.0 is invalid"):
        SGD(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="betas=\\(0.9, 1.0\\) is invalid"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="beta1=-0.1 is invalid"):
        Adam(betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="weight_decay=-1"):
        Adam(weight_decay=-1)
    with pytest.raises(ValueError, match="max_norm=0"):
        clip_grad_norm({}, 0)


def test_step_rejects_mismatched_dicts(rng):
    params = {"w": np.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"grads lacks \['w'\] and adds \['v'\]"):
        Adam().step(params, {"v": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"gradient 'w' has shape \(2,\); expected \(2, 2\)"):
        SGD(0.1).step(params, {"w": np.zeros(2)})
    optimizer = Adam()
    optimizer.step(params, {"w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="optimizer state has shape"):
        optimizer.step({"w": np.zeros(3)}, {"w": np.zeros(3)})
