"""The truth classes of a presence question and the answer each maps to at initialisation.

Apart from dawid_skene.py so that the sharded kernels (and the Beam engine) can use them
without importing crowd-kit (~1.5 s of scipy.stats).
"""
from __future__ import annotations

ABSENT, PRESENT = 0, 1
PRESENCE_OF_ANSWER: dict[str, int] = {"no": ABSENT, "maybe": PRESENT, "yes": PRESENT}
