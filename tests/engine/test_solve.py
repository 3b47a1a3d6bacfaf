from __future__ import annotations

import pytest
import torch

from qfedit.hparams import SolveConfig
from qfedit.solve import IllConditionedError, Preservation, seed_rule_formula, solve
from qfedit.statistics import Observations, Statistics

F64 = torch.float64


def _problem(d: int = 12, m: int = 40, n: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, m, generator=gen, dtype=F64)
    x = torch.randn(m, n, generator=gen, dtype=F64)  # columns are positions, as in the paper
    y = torch.randn(m, n, generator=gen, dtype=F64)
    b = torch.randn(d, n, generator=gen, dtype=F64)
    return w, x, y, b


def _observations(
    w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, s: torch.Tensor | None = None
) -> Observations:
    errors = (w @ x + b - w @ y).T  # e_i = W x_i + b_i - W y_i, rows are positions
    weights = s if s is not None else torch.ones(y.shape[1], dtype=F64)
    return Observations(keys=y.T.contiguous(), errors=errors, weights=weights)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_seed_rule_equals_published_formula(form: str) -> None:
    w, x, y, b = _problem()
    reference = seed_rule_formula(w, x, y, b)
    result = solve(w, _observations(w, x, y, b), SolveConfig(rule="seed", form=form))  # type: ignore[arg-type]
    assert result.form == form
    assert _rel(w + result.delta, reference) < 1e-6
    # The published update fits every position exactly.
    assert _rel((w + result.delta) @ y, w @ x + b) < 1e-8
    assert result.relative_norm == pytest.approx(float(result.delta.norm() / w.norm()))


def test_seed_rule_from_statistics_equals_formula() -> None:
    w, x, y, b = _problem(seed=3)
    stats = Statistics.from_observations(_observations(w, x, y, b), layer=0, fingerprint="f")
    result = solve(w, stats, SolveConfig(rule="seed"))
    assert result.form == "primal"
    assert _rel(w + result.delta, seed_rule_formula(w, x, y, b)) < 1e-6


def _preservation(m: int, seed: int = 1) -> Preservation:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(5 * m, m, generator=gen, dtype=F64)
    return Preservation(keys.T @ keys / keys.shape[0], ridge=1e-3)


def test_preserving_rule_primal_and_dual_agree_and_are_optimal() -> None:
    w, x, y, b = _problem(n=7)
    s = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.25], dtype=F64)
    obs = _observations(w, x, y, b, s)
    preservation = _preservation(w.shape[1])
    config = SolveConfig(rule="preserve", lam=0.7)
    dual = solve(w, obs, config.model_copy(update={"form": "dual"}), preservation)
    primal = solve(w, obs, config.model_copy(update={"form": "primal"}), preservation)
    assert (dual.form, primal.form) == ("dual", "primal")
    assert _rel(dual.delta, primal.delta) < 1e-9
    # Stationarity of sum s |dW y - e|^2 + lam |dW C^1/2|^2: (dW Y - E) S Y^T + lam dW C = 0.
    c = preservation.regularised()
    residual = dual.delta @ y - obs.errors.T
    gradient = residual @ torch.diag(s) @ y.T + 0.7 * dual.delta @ c
    assert float(gradient.norm()) < 1e-9 * float((obs.errors.T @ torch.diag(s) @ y.T).norm())


def test_auto_form_is_dual_for_few_positions_and_primal_for_many() -> None:
    w, x, y, b = _problem(d=6, m=10, n=4)
    assert solve(w, _observations(w, x, y, b), SolveConfig(rule="seed")).form == "dual"
    w, x, y, b = _problem(d=6, m=10, n=25)
    preservation = _preservation(10)
    assert solve(w, _observations(w, x, y, b), SolveConfig(), preservation).form == "primal"


def test_ill_conditioned_keys_are_refused_with_the_condition_number() -> None:
    w, x, y, b = _problem(n=3)
    y[:, 2] = y[:, 1] + 1e-7 * torch.randn(y.shape[0], dtype=F64)  # two nearly identical keys
    with pytest.raises(IllConditionedError, match=r"condition number [0-9.e+]+") as caught:
        solve(w, _observations(w, x, y, b), SolveConfig(rule="seed", max_condition=1e8))
    assert caught.value.condition > 1e8


def test_preserving_rule_needs_a_covariance_and_matching_shapes() -> None:
    w, x, y, b = _problem()
    with pytest.raises(ValueError, match="preservation covariance"):
        solve(w, _observations(w, x, y, b), SolveConfig())
    with pytest.raises(ValueError, match=r"\(12, 40\)"):
        solve(torch.zeros(12, 41, dtype=F64), _observations(w, x, y, b), SolveConfig(rule="seed"))


def test_statistics_add_and_subtract() -> None:
    w, x, y, b = _problem(n=10)
    obs = _observations(w, x, y, b)
    first = Observations(obs.keys[:6], obs.errors[:6], obs.weights[:6])
    second = Observations(obs.keys[6:], obs.errors[6:], obs.weights[6:])
    whole = Statistics.from_observations(obs, 2, "base")
    a = Statistics.from_observations(first, 2, "base")
    bb = Statistics.from_observations(second, 2, "base")
    total = a + bb
    assert total.positions == whole.positions == 10
    assert torch.allclose(total.keys_gram, whole.keys_gram, rtol=1e-12, atol=1e-12)
    assert torch.allclose(total.cross, whole.cross, rtol=1e-12, atol=1e-12)
    back = total - bb
    assert back.positions == 6
    assert torch.allclose(back.keys_gram, a.keys_gram, rtol=1e-12, atol=1e-10)
    assert torch.allclose(back.cross, a.cross, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="layer 3"):
        _ = a + Statistics.from_observations(second, 3, "base")
    with pytest.raises(ValueError, match="subtracted more"):
        _ = a - total


def test_statistics_round_trip_through_safetensors(tmp_path) -> None:
    w, x, y, b = _problem()
    stats = Statistics.from_observations(_observations(w, x, y, b), 5, "abc")
    stats.save(tmp_path / "s.safetensors")
    loaded = Statistics.load(tmp_path / "s.safetensors")
    assert (loaded.layer, loaded.fingerprint, loaded.positions) == (5, "abc", 9)
    assert torch.equal(loaded.keys_gram, stats.keys_gram) and torch.equal(loaded.cross, stats.cross)
    assert loaded.keys_gram.dtype == F64


def test_seed_rule_factorises_a_well_conditioned_gram_and_reports_its_condition() -> None:
    from qfedit.solve import _pinv_with_condition, _solve_gram

    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(300, 60, dtype=torch.float64, generator=generator)  # n > m: full rank
    gram, right = keys.T @ keys, torch.randn(7, 60, dtype=torch.float64, generator=generator)
    solved, condition = _solve_gram(gram, right)
    inverse, exact = _pinv_with_condition(gram)
    assert torch.allclose(solved, right @ inverse, rtol=1e-9, atol=1e-12)
    assert condition == pytest.approx(exact, rel=0.05)
    # Fewer positions than keys: a singular Gram; the minimum-norm solution, as the formula's pinv.
    few = keys[:20]
    solved, condition = _solve_gram(few.T @ few, right)
    inverse, exact = _pinv_with_condition(few.T @ few)
    assert torch.allclose(solved, right @ inverse, rtol=1e-8, atol=1e-10)
    assert condition == exact
