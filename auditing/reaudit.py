"""The rules of a re-audit: which pairs are asked again, and which vote wins.

A re-audit never asks a rater an (image, label) question that an earlier audit asked
(its votes carry over instead), and merges the new votes with the carried ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

VOTE_KEY = ["rater_id", "file_name", "label"]


def asked_pairs(release_table: pd.DataFrame) -> pd.DataFrame:
    """(file_name, label) pairs that have scores in a release table (``score_labels``)."""
    exploded = release_table[["file_name", "score_labels"]].explode("score_labels").dropna()
    return pd.DataFrame({"file_name": exploded["file_name"].astype(str),
                         "label": exploded["score_labels"].astype("int64")}).drop_duplicates(ignore_index=True)


def unasked(proposals: pd.DataFrame, asked: pd.DataFrame) -> pd.DataFrame:
    """The proposals whose (file_name, label) pair is not in ``asked`` (an anti-join)."""
    merged = proposals[["file_name", "label"]].merge(asked[["file_name", "label"]].drop_duplicates(),
                                                     on=["file_name", "label"], how="left", indicator=True)
    return proposals[(merged["_merge"] == "left_only").to_numpy()]


def merge_votes(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Votes from several sources, earlier frames first in precedence.

    A rater's answer to a question counts once: the same vote read again (a re-audit
    re-reads its vote files) is one vote, and where two sources disagree the earlier
    frame wins, so a corrected vote file given before the carried-over votes replaces
    the old answer."""
    frames = [f for f in frames if len(f)] or list(frames[:1])
    return pd.concat(frames, ignore_index=True).drop_duplicates(VOTE_KEY, keep="first", ignore_index=True)
