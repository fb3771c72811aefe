"""Contribution accounting: per-round scores of accepted updates (GTG-Shapley, leave-one-out, exact
Shapley, cosine), a cumulative ledger in the run store, and a payout split."""
from .accounting import METHODS, ContributionAccounting
from .payout import Payout, payout_csv, payout_split
from .shapley import Utility, exact_shapley, gtg_shapley, leave_one_out

__all__ = ["METHODS", "ContributionAccounting", "Payout", "payout_csv", "payout_split", "Utility", "exact_shapley",
           "gtg_shapley", "leave_one_out"]
