"""Gold (control) questions: questions whose truth is known, and the raters' answers on them.

Every crowd platform measures its raters on gold questions (control tasks, honeypots);
the ReaL scores were computed from rater matrices counted on 1,135 of them. A gold set
has two parts:

- the truth of each gold question (file_name, label): either given directly
  (``truth``), or from the experts' own votes with a rule such as "present if at least
  3 of the 5 experts said yes" (``PresenceRule``). Expert votes keep their yes counts,
  so another rule can be applied later (the original-label pseudo-rater of ReaL uses
  ">= 2 of 5");
- the raters' answers on those questions, in the ordinary vote schema
  (``auditing.votes``).

Formats:

- ``real-npz``: ReaL's ``golden.npz`` (experts) and ``raters_golden.npz`` (raters):
  both in the ``raters.npz`` layout (``tensor`` (people, questions, 3) one-hot over
  [no, maybe, yes], ``info``, ``ids``), read with ``votes.read_real_raters_raw``.
- long format, platform-neutral (CSV / JSONL / Parquet, picked by suffix): either a
  truth file ``file_name, label, truth`` (truth: true/false, 1/0, yes/no,
  present/absent) or the experts' votes in the vote schema (rater_id = expert); the
  raters' answers in the vote schema.

Validated like votes: a row that cannot be used is quarantined with a reason (the
vote reasons of ``auditing.votes`` plus the gold ones below), so that
``read == kept + quarantined`` for every part. A file that cannot be parsed at all
raises ``GoldFileError`` naming the file (and row).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic

from auditing import votes as votes_lib

TRUTH_COLUMNS: tuple[str, ...] = ("file_name", "label", "truth")
_TRUE = frozenset({"true", "1", "yes", "present", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "absent", "f", "n"})

# Gold quarantine reasons (besides the vote reasons of auditing.votes).
UNKNOWN_TRUTH = "unknown_truth"  # truth file: a truth value that is not a boolean
DUPLICATE_QUESTION = "duplicate_question"  # truth file: a question given twice
EXPERT_COUNT = "expert_count"  # expert votes: a question with another number of experts than the rule's
UNKNOWN_GOLD_QUESTION = "unknown_gold_question"  # a rater's answer on a question without gold truth
UNKNOWN_RATER = "unknown_rater"  # a rater who is not among the raters of the votes
GOLD_REASONS: tuple[str, ...] = (UNKNOWN_TRUTH, DUPLICATE_QUESTION, EXPERT_COUNT, UNKNOWN_GOLD_QUESTION,
                                 UNKNOWN_RATER)
QUARANTINE_COLUMNS: tuple[str, ...] = ("part", *votes_lib.QUARANTINE_COLUMNS, "truth")
PARTS: tuple[str, ...] = ("truth", "experts", "raters")


class GoldFileError(votes_lib.VoteFileError):
    """A gold file that cannot be read at all; the message names the file (and row)."""


class PresenceRule(pydantic.BaseModel):
    """A gold question is present iff at least ``min_yes`` of its ``of`` experts said yes.

    ``of`` is checked: an expert-voted question with another number of experts is
    quarantined (``expert_count``), so a rule never silently applies to fewer votes."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    min_yes: int = pydantic.Field(ge=1)
    of: int = pydantic.Field(ge=1)

    @pydantic.model_validator(mode="after")
    def _min_yes_at_most_of(self) -> "PresenceRule":
        if self.min_yes > self.of:
            raise ValueError(f"min_yes={self.min_yes} cannot exceed of={self.of}")
        return self

    def present(self, yes: np.ndarray) -> np.ndarray:
        return np.asarray(yes) >= self.min_yes

    def __str__(self) -> str:
        return f">= {self.min_yes} of {self.of} experts said yes"


# The rule of the published ReaL scores (issue 11; any yes-share threshold in (0.4, 0.6]).
REAL_RULE = PresenceRule(min_yes=3, of=5)


@dataclasses.dataclass(frozen=True)
class GoldSummary:
    read: dict[str, int]  # part -> rows read
    kept: dict[str, int]
    quarantined: dict[str, dict[str, int]]  # part -> reason -> count (reasons with a count only)

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "kept": self.kept, "quarantined": self.quarantined}


@dataclasses.dataclass(frozen=True)
class Gold:
    """Validated gold questions.

    ``questions``: one row per gold question: file_name, label, truth (bool, under
    ``rule`` or as given), yes (experts' yes count; -1 when the truth was given
    directly), experts (number of experts; 0 when given directly).
    ``rater_votes``: the raters' answers on gold questions, vote schema.
    ``quarantine``: ``QUARANTINE_COLUMNS``; ``read`` rows per part.
    """

    questions: pd.DataFrame
    rater_votes: pd.DataFrame
    quarantine: pd.DataFrame
    rule: PresenceRule | None
    read: dict[str, int]

    @property
    def images(self) -> np.ndarray:
        return pd.unique(self.questions["file_name"])

    @property
    def summary(self) -> GoldSummary:
        quarantined: dict[str, dict[str, int]] = {}
        for part in PARTS:
            counts = self.quarantine.loc[self.quarantine["part"] == part, "reason"].value_counts()
            quarantined[part] = {str(k): int(v) for k, v in counts.items()}
        kept = {part: self.read[part] - sum(quarantined[part].values()) for part in PARTS}
        return GoldSummary(read=dict(self.read), kept=kept, quarantined=quarantined)

    def truth(self, rule: PresenceRule | None = None) -> pd.DataFrame:
        """file_name, label, truth (bool) per gold question, under ``rule`` (default:
        the gold's own rule, or the truth as given)."""
        if rule is None or rule == self.rule:
            return self.questions[["file_name", "label", "truth"]]
        if self.rule is None:
            raise ValueError(f"the gold truth was given directly; the rule '{rule}' needs the experts' votes")
        if rule.of != self.rule.of:
            raise ValueError(f"rule '{rule}' counts {rule.of} experts, the gold questions have {self.rule.of}")
        return self.questions[["file_name", "label"]].assign(truth=rule.present(self.questions["yes"].to_numpy()))

    @classmethod
    def from_frames(cls, truth: pd.DataFrame, rater_votes: pd.DataFrame) -> "Gold":
        """Gold from in-memory frames that are already clean: ``truth`` (file_name,
        label, truth) and the raters' answers in the vote schema (checked)."""
        votes_lib.check_votes(rater_votes)
        questions = truth[["file_name", "label"]].assign(truth=truth["truth"].to_numpy(bool), yes=-1, experts=0)
        if questions.duplicated(["file_name", "label"]).any():
            raise ValueError("gold truth has duplicate (file_name, label) rows")
        empty = pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
        return cls(questions.reset_index(drop=True), rater_votes.reset_index(drop=True), empty, None,
                   {"truth": len(truth), "experts": 0, "raters": len(rater_votes)})

    def subset(self, images: Collection[str], *, keep: bool = True) -> "Gold":
        """The gold questions (and answers) of ``images`` (``keep=False``: of all other
        images), e.g. for k-fold evaluation. The quarantine and counts stay those read."""
        images = set(images)
        q = self.questions["file_name"].isin(images).to_numpy() == keep
        v = self.rater_votes["file_name"].isin(images).to_numpy() == keep
        return dataclasses.replace(self, questions=self.questions.loc[q].reset_index(drop=True),
                                   rater_votes=self.rater_votes.loc[v].reset_index(drop=True))


# ------------------------------------------------------------------------- readers


def read_gold(*, raters: str | os.PathLike | Sequence[str | os.PathLike],
              experts: str | os.PathLike | None = None, truth: str | os.PathLike | None = None,
              rule: PresenceRule | None = REAL_RULE, num_classes: int = votes_lib.DEFAULT_NUM_CLASSES,
              known_raters: Collection[str] | None = None, format: str | None = None) -> Gold:
    """Read and validate gold questions.

    Exactly one of ``experts`` (the experts' votes: ReaL ``golden.npz`` or a long vote
    file; truth = ``rule``) and ``truth`` (a ``file_name, label, truth`` file) is
    given. ``raters``: the raters' answers on gold questions (one or several vote
    files, any vote format). ``known_raters``: the raters of the audit's votes; gold
    answers of anyone else are quarantined (``unknown_rater``: they cannot inform any
    score). ``format`` forces the vote format of ``experts`` and ``raters``.
    """
    if (experts is None) == (truth is None):
        raise ValueError("read_gold needs exactly one of experts= (expert votes) and truth= (a truth file)")
    quarantines = []
    read: dict[str, int] = dict.fromkeys(PARTS, 0)
    if experts is not None:
        if rule is None:
            raise ValueError("expert votes need a rule (PresenceRule: present if >= min_yes of `of` experts)")
        raw = _read_vote_file(experts, "experts", format)
        read["experts"] = len(raw)
        kept, quarantine = votes_lib.validate_votes(raw, num_classes=num_classes, source=experts,
                                                    provenance=True)
        quarantines.append(quarantine.assign(part="experts"))
        questions, bad = _questions_from_experts(kept, rule, str(experts))
        quarantines.append(bad)
    else:
        raw = _read_truth_file(truth)
        read["truth"] = len(raw)
        questions, bad = _validate_truth(raw, num_classes, str(truth))
        quarantines.append(bad)
        rule = None
    paths = [raters] if isinstance(raters, (str, os.PathLike)) else list(raters)
    raw = pd.concat([_read_vote_file(p, "raters", format).assign(source=str(p)) for p in paths],
                    ignore_index=True) if paths else votes_lib.empty_votes().assign(row=[], source=[])
    read["raters"] = len(raw)
    kept, quarantine = votes_lib.validate_votes(raw, num_classes=num_classes, provenance=True)
    quarantines.append(quarantine.assign(part="raters"))
    rater_votes, bad = _validate_rater_answers(kept, questions, known_raters)
    quarantines.append(bad)
    quarantine = pd.concat([q.reindex(columns=QUARANTINE_COLUMNS) for q in quarantines], ignore_index=True)
    return Gold(questions, rater_votes, quarantine, rule, read)


def read_real_gold(experts: str | os.PathLike, raters: str | os.PathLike, rule: PresenceRule = REAL_RULE,
                   known_raters: Collection[str] | None = None) -> Gold:
    """ReaL's ``golden.npz`` + ``raters_golden.npz`` (default rule: >= 3 of 5 experts)."""
    return read_gold(experts=experts, raters=raters, rule=rule, known_raters=known_raters, format="real-npz")


def _read_vote_file(path: str | os.PathLike, part: str, format: str | None) -> pd.DataFrame:
    try:
        return votes_lib.read_votes(path, format=format)
    except votes_lib.VoteFileError as e:
        raise GoldFileError(f"gold {part}: {e}") from e


def _read_truth_file(path: str | os.PathLike) -> pd.DataFrame:
    """Raw rows (strings as given) + ``row`` (1-based data row / line number)."""
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise GoldFileError(f"{path}: no such gold truth file")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
            frame["row"] = np.arange(1, len(frame) + 1)
        elif suffix in (".jsonl", ".ndjson"):
            frame = pd.read_json(path, lines=True, dtype=False)
            frame["row"] = np.arange(1, len(frame) + 1)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path).reset_index(drop=True)
            frame["row"] = np.arange(1, len(frame) + 1)
        else:
            raise GoldFileError(f"{path}: cannot tell the gold truth format from the suffix {suffix!r}; "
                                "use .csv, .jsonl or .parquet")
    except GoldFileError:
        raise
    except Exception as e:  # pandas/pyarrow raise several unrelated types for a bad file
        raise GoldFileError(f"{path}: not a readable gold truth file: {e}") from e
    missing = [c for c in TRUTH_COLUMNS if c not in frame.columns]
    if missing:
        raise GoldFileError(f"{path}: the gold truth file lacks the field(s) {missing}; expected {list(TRUTH_COLUMNS)}")
    return frame


def _quarantine_rows(part: str, source: str, rows: np.ndarray, reasons: np.ndarray, details: np.ndarray,
                     frame: pd.DataFrame) -> pd.DataFrame:
    columns = {c: (frame[c].astype(object).to_numpy() if c in frame.columns else np.full(len(frame), None))
               for c in (*votes_lib.REQUIRED_COLUMNS, "truth")}
    return pd.DataFrame({"part": part, "source": source, "row": rows, "reason": reasons, "detail": details,
                         **columns}).reindex(columns=QUARANTINE_COLUMNS)


def _validate_truth(raw: pd.DataFrame, num_classes: int, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Truth rows -> questions, with the vote checks on file_name / label and the
    truth's own (boolean, one row per question)."""
    # Reuse the vote validator for file_name and label: a placeholder answer, and one
    # placeholder rater per row so that duplicates are judged here, among known truths.
    as_votes = raw.assign(rater_id=raw["row"].astype(str), answer="yes")
    kept, quarantine = votes_lib.validate_votes(as_votes[[*votes_lib.REQUIRED_COLUMNS, "row"]],
                                                num_classes=num_classes, source=source)
    bad_rows = quarantine.assign(part="truth", rater_id=None, answer=None)
    bad_rows["truth"] = raw.set_index("row").loc[bad_rows["row"], "truth"].to_numpy()
    good = raw.loc[~raw["row"].isin(quarantine["row"])].reset_index(drop=True)
    truth_text = good["truth"].astype(object).where(good["truth"].notna(), "").astype(str).str.strip().str.lower()
    truth = truth_text.isin(_TRUE).to_numpy()
    known = truth | truth_text.isin(_FALSE).to_numpy()
    kept = kept.assign(truth=truth, row=good["row"].to_numpy())
    duplicate = np.zeros(len(kept), dtype=bool)
    duplicate[known] = kept.loc[known].duplicated(["file_name", "label"], keep="first").to_numpy()
    reasons = np.where(~known, UNKNOWN_TRUTH, DUPLICATE_QUESTION)
    details = np.where(~known, [f"field 'truth': {v!r} is not one of true/false, 1/0, yes/no, present/absent"
                                for v in good["truth"].to_numpy()],
                       "this (file_name, label) came earlier")
    bad = ~known | duplicate
    bad_truth = _quarantine_rows("truth", source, kept["row"].to_numpy()[bad], reasons[bad], details[bad],
                                 good.loc[bad])
    questions = kept.loc[~bad, ["file_name", "label", "truth"]].assign(yes=-1, experts=0)
    return questions.reset_index(drop=True), pd.concat([bad_rows, bad_truth], ignore_index=True)


def _questions_from_experts(kept: pd.DataFrame, rule: PresenceRule, source: str
                            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Expert votes -> one row per question with its yes count; questions answered by
    another number of experts than ``rule.of`` are quarantined (all their votes)."""
    grouped = kept.assign(yes=(kept["answer"] == "yes").to_numpy()).groupby(["file_name", "label"], sort=False)
    questions = grouped.agg(yes=("yes", "sum"), experts=("rater_id", "size")).reset_index()
    wrong = questions["experts"].to_numpy() != rule.of
    bad = pd.DataFrame()
    if wrong.any():
        wrong_q = questions.loc[wrong].set_index(["file_name", "label"])["experts"]
        keys = pd.MultiIndex.from_frame(kept[["file_name", "label"]])
        in_wrong = keys.isin(wrong_q.index)
        rows = kept.loc[in_wrong]
        counts = wrong_q.reindex(pd.MultiIndex.from_frame(rows[["file_name", "label"]])).to_numpy()
        bad = _quarantine_rows("experts", source, rows["row"].to_numpy(),
                               np.full(len(rows), EXPERT_COUNT),
                               np.array([f"{c} experts answered this question; the rule '{rule}' needs {rule.of}"
                                         for c in counts], dtype=object), rows)
    questions = questions.loc[~wrong].reset_index(drop=True)
    questions["yes"] = questions["yes"].astype(np.int64)
    questions["experts"] = questions["experts"].astype(np.int64)
    questions.insert(2, "truth", rule.present(questions["yes"].to_numpy()))
    return questions, bad


def _validate_rater_answers(kept: pd.DataFrame, questions: pd.DataFrame, known_raters: Collection[str] | None
                            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raters' gold answers (kept with provenance): only on gold questions, and (if
    given) only from raters of the audit."""
    gold_keys = pd.MultiIndex.from_frame(questions[["file_name", "label"]])
    on_gold = pd.MultiIndex.from_frame(kept[["file_name", "label"]]).isin(gold_keys)
    known = (kept["rater_id"].isin(set(map(str, known_raters))).to_numpy() if known_raters is not None
             else np.ones(len(kept), dtype=bool))
    reasons = np.where(~on_gold, UNKNOWN_GOLD_QUESTION, UNKNOWN_RATER)
    details = np.where(~on_gold, "no gold truth for this (file_name, label)",
                       "this rater has no votes in the audit")
    bad = ~on_gold | ~known
    rows = kept.loc[bad]
    quarantine = _quarantine_rows("raters", "", rows["row"].to_numpy(), reasons[bad], details[bad], rows)
    quarantine["source"] = rows["source"].to_numpy()
    good = kept.loc[~bad].drop(columns=["source", "row"]).reset_index(drop=True)
    return good, quarantine


__all__ = ["GOLD_REASONS", "Gold", "GoldFileError", "GoldSummary", "PresenceRule", "QUARANTINE_COLUMNS",
           "REAL_RULE", "read_gold", "read_real_gold"]
