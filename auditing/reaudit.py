"""The rules of a re-audit: which pairs are asked again, and which vote wins.

A re-audit never asks a rater an (image, label) question that an earlier audit asked
(its votes carry over instead), and merges the new votes with the carried ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from auditing.votes import combined_key

VOTE_KEY = ["rater_id", "file_name", "label"]


def asked_pairs(release_table: pd.DataFrame) -> pd.DataFrame:
    """(file_name, label) pairs that have scores in a release table (``score_labels``)."""
    exploded = release_table[["file_name", "score_labels"]].explode("score_labels").dropna()
    return pd.DataFrame({"file_name": exploded["file_name"].astype(str),
                         "label": exploded["score_labels"].astype("int64")}).drop_duplicates(ignore_index=True)


def unasked(proposals: pd.DataFrame, asked: pd.DataFrame) -> pd.DataFrame:
    """The proposals whose (file_name, label) pair is not in ``asked`` (an anti-join).

    On one integer key per pair, the codes of both frames' values (equal values, NaN
    included, as a merge matches them): ~4x faster than a merge on the two columns."""
    n = len(proposals)
    codes, sizes = [], []
    for column in ("file_name", "label"):
        values = np.concatenate([proposals[column].to_numpy(), asked[column].to_numpy()])
        column_codes, uniques = pd.factorize(values, use_na_sentinel=False)
        codes.append(column_codes)
        sizes.append(len(uniques))
    key = combined_key(codes, sizes)
    assert key is not None  # two sizes of at most the row count each: the product fits
    return proposals[~pd.Index(key[:n]).isin(key[n:])]


def merge_votes(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Votes from several sources, earlier frames first in precedence.

    A rater's answer to a question counts once: the same vote read again (a re-audit
    re-reads its vote files) is one vote, and where two sources disagree the earlier
    frame wins, so a corrected vote file given before the carried-over votes replaces
    the old answer."""
    frames = [f for f in frames if len(f)] or list(frames[:1])
    return pd.concat(frames, ignore_index=True).drop_duplicates(VOTE_KEY, keep="first", ignore_index=True)
