"""The closed-form update of one `down_proj` weight: pure functions of float64 tensors.

Rows are positions: `keys` Y is (n, m), `errors` E is (n, d), weights s is (n,). With
`Ys = S^1/2 Y`, `Es = S^1/2 E`, `A = Ys^T Ys` and `M = Es^T Ys`:

- seed rule (QF as published), minimum-norm exact fit of `dW y_i = e_i`:
  primal `dW = M A^+`, dual `dW = Es^T (Ys Ys^T)^+ Ys`;
- preserving rule, `min sum s_i |dW y_i - e_i|^2 + lam |dW C^1/2|^2`:
  primal `dW = M (A + lam C)^-1`, dual (push-through identity)
  `dW = Es^T (I + Ys (lam C)^-1 Ys^T)^-1 Ys (lam C)^-1`.

The dual forms cost `n x n` solves and need the per-position observations; the primal forms need
only the statistics and cost `m x m` solves. Both agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qfedit.errors import InvalidInputError
from qfedit.hparams import SolveConfig, SolveForm
from qfedit.statistics import Observations, Statistics

_F64 = torch.float64


class IllConditionedError(InvalidInputError):
    """The system is too ill-conditioned to trust; solving would give a huge, meaningless update."""

    def __init__(self, what: str, condition: float, limit: float) -> None:
        self.condition = condition
        self.limit = limit
        super().__init__(
            f"{what} has condition number {condition:.3g} (limit {limit:.3g}): the keys are nearly collinear; "
            "use the preserving rule, a larger ridge, or fewer, more distinct facts"
        )


def seed_rule_formula(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The published QF formula, literally: `W' = W - [W(Y - X) - B](Y^T Y)^+ Y^T`.

    Columns are positions: `X`, `Y` are (m, n), `B = V - V'` is (d, n). Kept as the reference
    that `solve_seed` is tested against.
    """
    w, x, y, b = (t.to(_F64) for t in (weight, x, y, b))
    return w - (w @ (y - x) - b) @ torch.linalg.pinv(y.T @ y, hermitian=True) @ y.T


def _pinv_with_condition(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pseudo-inverse of a symmetric PSD matrix, and the condition number of its non-null part."""
    values, vectors = torch.linalg.eigh(gram)
    top = float(values.max().clamp(min=0))
    if top == 0:
        return torch.zeros_like(gram), float("inf")
    # The same cut-off as torch.linalg.pinv: directions below it are the null space (n < m, or
    # repeated keys), not ill-conditioning.
    cutoff = top * max(gram.shape) * torch.finfo(_F64).eps
    kept = values > cutoff
    inverse = torch.where(kept, 1.0 / values.clamp(min=cutoff), torch.zeros_like(values))
    condition = top / float(values[kept].min())
    return (vectors * inverse) @ vectors.T, condition


# Below this estimated condition number a Cholesky solve of the seed rule's Gram matrix is accurate
# to ~1e-8 in float64, and the matrix has no direction `pinv` would cut off as null (its cut-off is
# at ~1e-12 of the top eigenvalue); above it, or when the factorisation fails (fewer positions than
# keys: a singular Gram), the eigendecomposition decides what is null.
_FACTOR_CONDITION = 1e8


def _extreme_eigenvalues(gram: torch.Tensor, factor: torch.Tensor, steps: int = 40) -> tuple[float, float]:
    """Estimates of the largest and smallest eigenvalues of a positive definite `gram` from its
    Cholesky `factor`: power iteration on it and on its inverse, O(steps * m^2) where the
    eigendecomposition is O(m^3)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(gram.shape[0], 1, dtype=_F64, generator=generator).to(gram.device)
    top, vector = 0.0, start / start.norm()
    for _ in range(steps):
        product = gram @ vector
        top = float(product.norm())
        vector = product / top
    inverse_top, vector = 0.0, start / start.norm()
    for _ in range(steps):
        product = torch.cholesky_solve(vector, factor)
        inverse_top = float(product.norm())
        vector = product / inverse_top
    return top, 1.0 / inverse_top


def _solve_gram(gram: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`right @ pinv(gram)` for a symmetric PSD `gram`, and its condition number: by Cholesky when
    `gram` is well conditioned (a factorisation is several times cheaper than `eigh`), else by the
    eigendecomposition, which also handles a singular `gram` (the minimum-norm solution)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        top, bottom = _extreme_eigenvalues(gram, factor)
        condition = top / bottom if bottom > 0 else float("inf")
        if condition < _FACTOR_CONDITION:
            return torch.cholesky_solve(right.T, factor).T, condition
    inverse, condition = _pinv_with_condition(gram)
    return right @ inverse, condition


def _cholesky_with_condition(matrix: torch.Tensor, what: str, limit: float) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise IllConditionedError(what + " (not positive definite)", float("inf"), limit)
    diagonal = factor.diagonal()
    # (max L_ii / min L_ii)^2 is a cheap lower bound of the condition number: an m x m eigen
    # decomposition would cost more than the solve itself.
    condition = float((diagonal.max() / diagonal.min()) ** 2)
    if condition > limit:
        raise IllConditionedError(what, condition, limit)
    return factor


@dataclass
class Preservation:
    """The preservation covariance `C = E[k k^T]` at a layer, with its regularised Cholesky factor."""

    covariance: torch.Tensor  # (m, m) float64
    ridge: float
    corpus_digest: str | None = None
    """Which corpus the covariance was measured on (`qfedit.covariance.corpus_digest`)."""
    _factor: torch.Tensor | None = field(default=None, repr=False)

    def regularised(self) -> torch.Tensor:
        c = self.covariance.to(_F64)
        scale = float(c.diagonal().mean()) if c.numel() else 0.0
        return c + (self.ridge * scale) * torch.eye(c.shape[0], dtype=_F64, device=c.device)

    def factor(self, limit: float) -> torch.Tensor:
        if self._factor is None:
            self._factor = _cholesky_with_condition(self.regularised(), "the preservation covariance", limit)
        return self._factor


@dataclass(frozen=True)
class SolveResult:
    delta: torch.Tensor  # (d, m) float64
    rule: str
    form: str
    condition_number: float
    relative_norm: float
    """`|dW| / |W|`, Frobenius."""
    positions: int


def pick_form(form: SolveForm, positions: int, m: int) -> str:
    """`auto` is the cheaper form: `n x n` systems (dual) while there are fewer positions than keys."""
    if form != "auto":
        return form
    return "dual" if positions < m else "primal"


def _pick_form(form: SolveForm, source: Observations | Statistics, m: int) -> str:
    if form == "dual" and isinstance(source, Statistics):
        raise InvalidInputError("the dual form needs per-position observations, not statistics")
    if isinstance(source, Statistics):
        return "primal"
    return pick_form(form, int(source.keys.shape[0]), m)


def solve_seed(source: Observations | Statistics, config: SolveConfig) -> tuple[torch.Tensor, float, str]:
    """Minimum-norm exact fit; returns `(dW, condition number, form)`."""
    m = source.keys.shape[1] if isinstance(source, Observations) else source.keys_gram.shape[0]
    form = _pick_form(config.form, source, m)
    if form == "dual":
        assert isinstance(source, Observations)
        ys, es = source.scaled
        coefficients, condition = _solve_gram(ys @ ys.T, es.T)  # (d, n) = E^T (Y Y^T)^+
        delta = coefficients @ ys
    else:
        stats = source if isinstance(source, Statistics) else Statistics.from_observations(source, -1, "")
        delta, condition = _solve_gram(stats.keys_gram, stats.cross)  # M A^+, (m, m) system
    if condition > config.max_condition:
        raise IllConditionedError("the keys' Gram matrix", condition, config.max_condition)
    return delta, condition, form


def solve_preserve(
    source: Observations | Statistics, preservation: Preservation, config: SolveConfig
) -> tuple[torch.Tensor, float, str]:
    """Least-squares fit regularised towards the base behaviour on the preservation corpus."""
    c = preservation.covariance
    m = c.shape[0]
    form = _pick_form(config.form, source, m)
    if form == "dual":
        assert isinstance(source, Observations)
        ys, es = source.scaled
        if ys.shape[1] != m:
            raise InvalidInputError(f"keys have {ys.shape[1]} features, the covariance is {tuple(c.shape)}")
        factor = preservation.factor(config.max_condition)
        z = torch.cholesky_solve(ys.T, factor).T / config.lam  # (n, m) = Ys (lam C)^-1
        inner = torch.eye(ys.shape[0], dtype=_F64, device=ys.device) + z @ ys.T  # (n, n)
        inner_factor = _cholesky_with_condition(inner, "the dual system", config.max_condition)
        delta = torch.cholesky_solve(es, inner_factor).T @ z
        condition = float(torch.linalg.cond(inner)) if ys.shape[0] <= 4096 else float("nan")
    else:
        stats = source if isinstance(source, Statistics) else Statistics.from_observations(source, -1, "")
        if stats.keys_gram.shape != c.shape:
            raise InvalidInputError(
                f"A is {tuple(stats.keys_gram.shape)}, the covariance is {tuple(c.shape)}"
            )
        system = stats.keys_gram + config.lam * preservation.regularised()  # (m, m)
        factor = _cholesky_with_condition(system, "A + lambda C", config.max_condition)
        delta = torch.cholesky_solve(stats.cross.T, factor).T  # M (A + lam C)^-1, symmetric system
        diagonal = factor.diagonal()
        condition = float((diagonal.max() / diagonal.min()) ** 2)
    return delta, condition, form


def solve(
    weight: torch.Tensor,
    source: Observations | Statistics,
    config: SolveConfig,
    preservation: Preservation | None = None,
) -> SolveResult:
    """Solve `dW` for the base `weight` (d x m) with the configured rule."""
    d, m = weight.shape
    cross_shape = source.errors.shape[1] if isinstance(source, Observations) else source.cross.shape[0]
    key_width = source.keys.shape[1] if isinstance(source, Observations) else source.keys_gram.shape[0]
    if (cross_shape, key_width) != (d, m):
        raise InvalidInputError(
            f"statistics are for a ({cross_shape}, {key_width}) weight, the weight is ({d}, {m})"
        )
    positions = source.keys.shape[0] if isinstance(source, Observations) else source.positions
    if positions == 0:
        raise InvalidInputError("no captured positions to solve for")
    if config.rule == "seed":
        delta, condition, form = solve_seed(source, config)
    else:
        if preservation is None:
            raise InvalidInputError("the preserving rule needs a preservation covariance")
        delta, condition, form = solve_preserve(source, preservation, config)
    if not torch.isfinite(delta).all():
        raise IllConditionedError("the solve", float("inf"), config.max_condition)
    relative = float(delta.norm() / weight.to(_F64).norm().clamp(min=torch.finfo(_F64).tiny))
    return SolveResult(delta, config.rule, form, condition, relative, int(positions))
