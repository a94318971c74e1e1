"""Seeds derived from several integers (run seed, epoch, rank, batch index...)."""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part and on their order."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return seed
