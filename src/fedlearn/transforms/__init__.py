"""Update transforms: a client-side half (after local training) and server-side halves (before and after
aggregation), chained in order. DP clipping and noise, compression and secure-aggregation masking plug in
here without the round loop or the strategy knowing which ran."""
from .base import Transform

__all__ = ["Transform"]
