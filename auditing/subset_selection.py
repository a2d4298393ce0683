"""Stage 3 of METHOD.md: choose the model subset whose proposals best match a gold standard.

Definitions, for a subset S of the models and the gold images G (every image with a
gold entry, also those whose gold set is empty):

- P(S): stage 2 run on S (``auditing.proposals``), restricted to G: the pairs that
  at least 2 (model, criterion) top-N selections of models in S hold, plus the top-1
  of every model in S, plus the original label of every image. Each model's top-N
  selections are global over the whole split, computed once for all subsets.
- T: the gold pairs {(i, l) : i in G, l in gold(i)}, including pairs no model proposes.
- precision(S) = |P(S) & T| / |P(S)|; recall(S) = |P(S) & T| / |T|;
  proposals per image = |P(S)| / |G|.

The empty subset is scored too (its proposals are the original labels). The chosen
subset has the highest precision among those with recall >= ``recall_target``; ties
go to fewer models, then fewer proposals. If no subset reaches the target, the one
with the highest recall is chosen and ``target_met_`` is False.

Search. Exhaustive over all 2^M subsets (M <= ``max_exhaustive_models``) without
pooling each subset: a pair is *not* proposed by S exactly when S misses the pair's
proposers A_p, or S meets A_p in one model m that selected it once and not as top-1.
Summed over pairs, both terms are subset-sum (zeta) transforms over the models'
bitmasks, O(M^2 2^M) in all (about a second for 19 models). Above that size, a greedy
backward elimination (drop the model whose removal keeps recall >= target at the
highest precision) scores subsets one by one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pandas as pd

from auditing.proposals import ProposalPool, popcount

SEARCHES = ("auto", "exhaustive", "greedy")


@dataclasses.dataclass(frozen=True)
class GoldPairs:
    """The candidate pairs on gold images that are not original labels, and the constants."""

    logit_models: np.ndarray
    prob_models: np.ndarray
    top1_models: np.ndarray
    is_gold: np.ndarray
    originals: int  # original-label pairs on gold images (always proposed)
    gold_originals: int  # ... of which in T
    gold_pairs: int  # |T|
    gold_images: int

    @classmethod
    def of(cls, pool: ProposalPool, gold: Mapping[str, frozenset[int]]) -> GoldPairs:
        position = pd.Index(pool.file_names)
        gold_names = list(gold)
        image_of = position.get_indexer(gold_names)
        if (image_of < 0).any():
            missing = [n for n, i in zip(gold_names, image_of) if i < 0]
            raise ValueError(f"{len(missing)} gold image(s) have no predictions, e.g. {missing[:3]}")
        bad = sorted({label for name in gold_names for label in gold[name]
                      if not 0 <= int(label) < pool.num_classes})
        if bad:
            raise ValueError(f"gold labels {bad[:5]} are outside the models' {pool.num_classes} classes")
        gold_keys = np.array(sorted(int(i) * pool.num_classes + int(label)
                                    for i, name in zip(image_of, gold_names) for label in gold[name]),
                             dtype=np.int64)
        on_gold = np.isin(pool.image, image_of)
        keys = pool.image[on_gold] * pool.num_classes + pool.label[on_gold]
        is_gold = np.isin(keys, gold_keys)
        original = pool.is_original[on_gold]
        return cls(pool.logit_models[on_gold][~original], pool.prob_models[on_gold][~original],
                   pool.top1_models[on_gold][~original], is_gold[~original],
                   originals=int(original.sum()), gold_originals=int((is_gold & original).sum()),
                   gold_pairs=int(gold_keys.size), gold_images=len(gold_names))

    def weights(self) -> np.ndarray:
        """(2, pairs): every pair counts in row 0, gold pairs in row 1."""
        return np.stack([np.ones(self.is_gold.size), self.is_gold.astype(np.float64)])

    def score(self, mask: int) -> tuple[int, int]:
        """(proposals, true proposals) of one subset, by applying stage 2's rule."""
        m = np.uint64(mask)
        count = popcount(self.logit_models & m) + popcount(self.prob_models & m)
        proposed = (count >= 2) | ((self.top1_models & m) != 0)
        return (int(proposed.sum()) + self.originals,
                int((proposed & self.is_gold).sum()) + self.gold_originals)


def _zeta(h: np.ndarray, num_models: int) -> np.ndarray:
    """Subset sums along the last axis: out[..., T] = sum of h[..., A] over A subset of T."""
    out = h.copy()
    for bit in range(num_models):
        view = out.reshape(out.shape[0], -1, 2, 1 << bit)
        view[:, :, 1, :] += view[:, :, 0, :]
    return out


def score_all_subsets(pairs: GoldPairs, num_models: int) -> tuple[np.ndarray, np.ndarray]:
    """(proposals, true proposals) for every subset mask 0 .. 2^M - 1 (see the module docstring)."""
    size = 1 << num_models
    weights = pairs.weights()
    support = (pairs.logit_models | pairs.prob_models | pairs.top1_models).astype(np.int64)

    def histogram(index: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(index, weights=row, minlength=size) for row in w])

    # not_proposed[S] = Z[h](~S) + sum_m [m in S] Z[h_m](~S); index ~S == reversed index S.
    not_proposed = _zeta(histogram(support, weights), num_models)[:, ::-1].copy()
    for m in range(num_models):
        bit = np.uint64(1 << m)
        once = ((pairs.logit_models & bit) != 0) != ((pairs.prob_models & bit) != 0)
        lone = once & ((pairs.top1_models & bit) == 0)
        if not lone.any():
            continue
        rest = support[lone] & ~(1 << m)
        term = _zeta(histogram(rest, weights[:, lone]), num_models)[:, ::-1]
        with_m = not_proposed.reshape(2, -1, 2, 1 << m)
        with_m[:, :, 1, :] += term.reshape(2, -1, 2, 1 << m)[:, :, 1, :]
    total = weights.sum(axis=1, keepdims=True)
    proposed, true = np.rint(total - not_proposed).astype(np.int64)
    return proposed + pairs.originals, true + pairs.gold_originals


class ModelSubsetSelector:
    """Pick the most precise model subset with recall >= ``recall_target`` (module docstring).

    ``fit(pool, gold)`` takes :func:`auditing.proposals.candidate_pool` of all models
    (every pair any model touched, not yet filtered) and {file_name: gold label set}.
    Results: ``table_`` (one row per subset tried: ``mask``, ``models`` joined by "+",
    ``n_models``, ``proposals``, ``true_proposals``, ``precision``, ``recall``,
    ``proposals_per_image``), ``best_`` (its chosen row), ``best_models_``,
    ``best_mask_``, ``target_met_``, ``gold_images_``, ``search_``.
    """

    def __init__(self, recall_target: float = 0.97, search: str = "auto",
                 max_exhaustive_models: int = 20):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must lie in (0, 1], got {recall_target}")
        self.recall_target = recall_target
        self.search = search
        self.max_exhaustive_models = max_exhaustive_models

    def fit(self, pool: ProposalPool, gold: Mapping[str, frozenset[int]]) -> ModelSubsetSelector:
        if not gold:
            raise ValueError("no gold images")
        pairs = GoldPairs.of(pool, gold)
        num_models = len(pool.model_names)
        exhaustive = (self.search == "exhaustive"
                      or (self.search == "auto" and num_models <= self.max_exhaustive_models))
        if exhaustive:
            masks = np.arange(1 << num_models, dtype=np.uint64)
            proposed, true = score_all_subsets(pairs, num_models)
        else:
            masks, proposed, true = self._greedy(pairs, num_models)
        self.search_ = "exhaustive" if exhaustive else "greedy"
        self.gold_images_ = pairs.gold_images
        self.table_ = self._table(pool, pairs, masks, proposed, true)
        self.best_ = self._choose(self.table_)
        self.best_mask_ = int(self.best_["mask"])
        self.best_models_ = pool.names_of(self.best_mask_)
        self.target_met_ = bool(self.best_["recall"] >= self.recall_target)
        return self

    def _greedy(self, pairs: GoldPairs, num_models: int):
        current = (1 << num_models) - 1
        tried = {current: pairs.score(current)}
        while current:
            options = []
            for m in range(num_models):
                if current >> m & 1:
                    candidate = current & ~(1 << m)
                    tried.setdefault(candidate, pairs.score(candidate))
                    proposed, true = tried[candidate]
                    if true / max(pairs.gold_pairs, 1) >= self.recall_target:
                        options.append((true / proposed, -candidate.bit_count(), candidate))
            if not options:
                break
            current = max(options)[2]
        masks = np.array(sorted(tried), dtype=np.uint64)
        scores = np.array([tried[int(m)] for m in masks], dtype=np.int64).reshape(-1, 2)
        return masks, scores[:, 0], scores[:, 1]

    @staticmethod
    def _table(pool: ProposalPool, pairs: GoldPairs, masks: np.ndarray, proposed: np.ndarray,
               true: np.ndarray) -> pd.DataFrame:
        names = np.array(pool.model_names, dtype=object)
        bits = ((masks[:, None] >> np.arange(len(names), dtype=np.uint64)) & np.uint64(1)).astype(bool)
        return pd.DataFrame({
            "mask": masks,
            "models": ["+".join(names[row]) for row in bits],
            "n_models": bits.sum(axis=1),
            "proposals": proposed,
            "true_proposals": true,
            "precision": true / np.maximum(proposed, 1),
            "recall": true / max(pairs.gold_pairs, 1),
            "proposals_per_image": proposed / pairs.gold_images,
        })

    def _choose(self, table: pd.DataFrame) -> pd.Series:
        feasible = table[table["recall"] >= self.recall_target]
        if len(feasible):
            ranked = feasible.sort_values(["precision", "n_models", "proposals", "mask"],
                                          ascending=[False, True, True, True])
        else:
            ranked = table.sort_values(["recall", "precision", "n_models", "mask"],
                                       ascending=[False, False, True, True])
        return ranked.iloc[0]
