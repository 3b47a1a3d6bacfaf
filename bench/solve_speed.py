"""Solve time of the seed and preserving rules as captured positions grow (prints a table).

    python bench/solve_speed.py                       # m = 4864 and 8960, n = 100, 1,000, 10,000
    python bench/solve_speed.py --m 4864 --positions 100 1000 --device cuda

Random keys and errors of Qwen2.5-0.5B (d = 896, m = 4864) and -1.5B (d = 1536, m = 8960) sizes.
The preserving rule's covariance factor is computed once per `m` (it is cached per layer in use)
and reported on its own row; each solve after it is timed alone.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from qfedit.hparams import SolveConfig
from qfedit.solve import IllConditionedError, Preservation, solve
from qfedit.statistics import Observations

SIZES = {4864: 896, 8960: 1536}


def _time(device: torch.device, work: object) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[4864, 8960])
    parser.add_argument("--positions", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    f64 = torch.float64
    table = Table(title=f"solve time (float64, {device})")
    for column in ("m", "d", "positions", "rule", "form", "seconds", "|dW|/|W|", "condition"):
        table.add_column(column, justify="right")
    for m in args.m:
        d = SIZES.get(m, m // 5)
        gen = torch.Generator(device="cpu").manual_seed(m)
        weight = (torch.randn(d, m, generator=gen, dtype=f64) / m**0.5).to(device)
        basis = torch.randn(m, m, generator=gen, dtype=f64).to(device) / m**0.5
        preservation = Preservation(basis @ basis.T, ridge=1e-2)
        seconds, _ = _time(device, lambda p=preservation: p.factor(1e12))
        table.add_row(str(m), str(d), "-", "preserve", "covariance factor", f"{seconds:.2f}", "-", "-")
        for n in args.positions:
            keys = torch.randn(n, m, generator=gen, dtype=f64).to(device)
            errors = torch.randn(n, d, generator=gen, dtype=f64).to(device) * 0.1
            obs = Observations(keys, errors, torch.ones(n, dtype=f64, device=device))
            for rule in ("seed", "preserve"):
                config = SolveConfig(rule=rule, max_condition=1e14)  # type: ignore[arg-type]
                try:
                    seconds, result = _time(
                        device, lambda c=config, o=obs, w=weight, p=preservation: solve(w, o, c, p)
                    )
                except IllConditionedError as error:
                    table.add_row(str(m), str(d), str(n), rule, "-", "refused", "-", f"{error.condition:.3g}")
                    continue
                table.add_row(
                    str(m),
                    str(d),
                    str(n),
                    rule,
                    result.form,
                    f"{seconds:.2f}",
                    f"{result.relative_norm:.3g}",  # type: ignore[attr-defined]
                    f"{result.condition_number:.3g}",  # type: ignore[attr-defined]
                )
            Console().print(f"m={m} n={n} done", style="dim")
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
