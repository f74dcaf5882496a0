"""A run tree's account: every model call of a run, its sub-calls and its child runs is paid
from one budget in the ledger, reserved before the call and settled after.

The reservation is an upper bound of the call's cost: its input estimated generously from the
prompt's characters, its output at the output cap the call is sent with (the per-call cap, or
less when less of the budget is left). So a budget holds whichever pod makes the call and
however many calls run at once: a run spends at most its budget, plus the amount by which the
calls in flight when it ran out under-estimated their input.
"""

from __future__ import annotations

from typing import Any

from functions.contract import ModelUsage, UsageByModel, total_usage
from functions.infer.ledger import BudgetRefused, Ledger, RunKey

CHARS_PER_RESERVED_TOKEN = 3  # fewer than a tokenizer's ~4: a reservation errs on the high side


class Account:
    """The model client of one run tree, charging the ledger; and what the tree has spent."""

    def __init__(self, llm: Any, ledger: Ledger, root: RunKey, output_cap: int) -> None:
        self.llm = llm
        self.ledger = ledger
        self.root = root
        self.output_cap = output_cap
        self.prices = llm.prices
        self._budgets: dict[str, float] | None = None  # a run's budgets do not change

    def complete(self, messages: Any, model: str, deadline: float | None = None) -> Any:
        """One model call, paid from the budget: `BudgetRefused` before the call if it may not
        fit; the run then stops with that budget's stop code."""
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        tokens_in = chars // CHARS_PER_RESERVED_TOKEN + 16 * len(messages)
        price = self.prices.price(model) or (0.0, 0.0)
        try:
            if self._budgets is None:
                self._budgets = self.ledger.budgets(self.root)
            held = self.ledger.reserve(self.root, tokens_in, self.output_cap, price, self._budgets)
        except BudgetRefused as refused:
            self.ledger.stop(self.root, refused.code, refused.message)
            raise
        try:
            completion = self.llm.complete(
                messages, model, deadline=deadline, max_tokens=held.output_tokens
            )
        except BaseException:
            self.ledger.release(self.root, held)
            raise
        self.ledger.settle(self.root, held, completion.model, completion.usage)
        return completion

    def usage(self) -> UsageByModel:
        return self.ledger.spent(self.root)

    def total(self) -> ModelUsage:
        return total_usage(self.usage())

    def stopped(self) -> tuple[str, str] | None:
        """(stop code, reason) when a refused reservation stopped the run."""
        return self.ledger.stopped(self.root)

    def cancelled(self) -> bool:
        return self.ledger.cancelled(self.root)
