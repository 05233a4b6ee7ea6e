"""What a report compares, with its defaults: the one source for `mapray report` / `mapray show` flags. Light (no
Ray, no pyarrow), so the command line can show the defaults without importing the passes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mapray.errors import ConfigError


@dataclass(frozen=True)
class ReportSettings:
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.5)  # the paper's ablation uses 0.25, 1.0 and 2.5
    noise_fraction: float = 0.1  # share of pairs the noise audit swaps (the paper's noise test: 10%)
    noise_seed: int = 0
    by: str | None = None  # an input column of scored/ to break the pool down by
    rank_bins: int = 4096  # bins per ranked score: a cut-off bin holds about n / rank_bins rows
    sample_rows: int = 20_000  # the scatter plot's sample, also the sample the bin edges come from
    # the reward-bias audit's strengths: lambda = fraction x std(margin) / std(bias difference)
    bias_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)

    def check(self) -> None:
        """A bad setting stops the report before Ray starts, one line naming the flag."""
        if not self.alphas or not all(math.isfinite(a) and a >= 0 for a in self.alphas):
            raise ConfigError(f"--alphas: every alpha must be a finite number >= 0, got {list(self.alphas)}")
        if not 0 < self.noise_fraction < 1:
            raise ConfigError(f"--noise-fraction: must be in (0, 1), got {self.noise_fraction}")
        if not self.bias_fractions or not all(math.isfinite(f) and f >= 0 for f in self.bias_fractions):
            raise ConfigError(f"--bias-fractions: every fraction must be a finite number >= 0, got "
                              f"{list(self.bias_fractions)}")
        if self.rank_bins < 1 or self.sample_rows < 1:
            raise ConfigError(f"rank_bins and sample_rows must be >= 1, got {self.rank_bins}, {self.sample_rows}")
