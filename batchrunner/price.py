"""Prices: the one place that turns tokens into dollars (runs, dry runs, reports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_PRICE_IN = 3.0
"""Dollars per million input tokens: Anthropic's list price for Claude 3.5 Sonnet."""
DEFAULT_PRICE_OUT = 15.0
"""Dollars per million output tokens: Anthropic's list price for Claude 3.5 Sonnet."""


@dataclass(frozen=True, slots=True)
class PriceList:
    """Dollars per million tokens, in and out."""

    input_per_mtok: float = DEFAULT_PRICE_IN
    output_per_mtok: float = DEFAULT_PRICE_OUT

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


def usage_tokens(message: Any) -> tuple[int, int]:
    """(input, output) tokens an Anthropic message reports; 0 for what it does not."""
    usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    # Counts are positive ints; `type() is`: a bool is not a count. Inline, not
    # a helper: twice a result line (issue 12's bytecode count).
    return (
        tokens_in if type(tokens_in) is int and tokens_in > 0 else 0,
        tokens_out if type(tokens_out) is int and tokens_out > 0 else 0,
    )
