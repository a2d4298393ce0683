"""ImageNet-1k classes and the WordNet hierarchy above them.

Class index = position of the wnid in the sorted list of the 1000 ILSVRC-2012 wnids
(the order TFDS, torchvision and timm use). The wnids and the 50k validation labels
ship inside the tensorflow-datasets wheel; lemmas and glosses come from timm's
WordNet tables and the is-a edges from BREEDS' WordNet hierarchy (both pinned in
``auditing.sources``). ImageNet wnids are WordNet 3.0 noun offsets.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
import importlib.util
from pathlib import Path

import numpy as np

from auditing import sources

NUM_CLASSES = 1000
# WordNet roots of the Shankar et al. (2020) subsets.
DOG_WNID = "n02084071"  # dog, domestic dog, Canis familiaris
ORGANISM_WNID = "n00004475"  # organism, being


def _tfds_resource(relative: str) -> Path:
    """A data file inside the tensorflow-datasets wheel, found without importing the
    package (importing it costs seconds; these are plain text files)."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tensorflow-datasets is not installed (it ships the ImageNet labels)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


@dataclasses.dataclass(frozen=True)
class ImageNetClasses:
    """The 1000 classes: wnid, first lemma (the readable name), all lemmas, gloss."""

    wnids: list[str]
    names: list[str]
    lemmas: list[str]
    glosses: list[str]

    def __len__(self) -> int:
        return len(self.wnids)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    def index_of(self, wnid: str) -> int:
        try:
            return self._index[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not one of the {len(self.wnids)} ImageNet classes") from None


def _read_tab_table(path: Path) -> dict[str, str]:
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            table[key] = value
    return table


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 sorted wnids, from the tensorflow-datasets wheel."""
    path = _tfds_resource("datasets/imagenet2012/labels.txt")
    wnids = tuple(path.read_text().split())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(wnids):
        raise ValueError(f"{path}: expected {NUM_CLASSES} sorted wnids, got {len(wnids)}")
    return wnids


@functools.lru_cache(maxsize=1)
def load_classes() -> ImageNetClasses:
    wnids = list(imagenet_wnids())
    lemma_table = _read_tab_table(sources.fetch("synset_lemmas"))
    gloss_table = _read_tab_table(sources.fetch("synset_glosses"))
    lemmas = [lemma_table[w] for w in wnids]
    return ImageNetClasses(
        wnids=wnids,
        names=[lemma.split(",")[0].strip() for lemma in lemmas],
        lemmas=lemmas,
        glosses=[gloss_table.get(w, "") for w in wnids],
    )


class WordNetHierarchy:
    """The WordNet is-a DAG (some synsets have several parents)."""

    def __init__(self, edges: Sequence[tuple[str, str]],
                 names: Mapping[str, str] | Callable[[], Mapping[str, str]]):
        self._parents: dict[str, list[str]] = {}
        for parent, child in edges:
            self._parents.setdefault(child, []).append(parent)
        # Names only serve name(): load_hierarchy reads its 80k-line table when first asked.
        self._names_or_loader = names

    @functools.cached_property
    def _names(self) -> Mapping[str, str]:
        names = self._names_or_loader
        return names() if callable(names) else names

    def parents(self, wnid: str) -> list[str]:
        return list(self._parents.get(wnid, ()))

    def name(self, wnid: str) -> str:
        return self._names.get(wnid, wnid).split(",")[0].strip()

    @functools.lru_cache(maxsize=None)
    def ancestors(self, wnid: str) -> frozenset[str]:
        """All strict ancestors over every parent path."""
        seen: set[str] = set()
        queue = deque(self._parents.get(wnid, ()))
        while queue:
            node = queue.popleft()
            if node not in seen:
                seen.add(node)
                queue.extend(self._parents.get(node, ()))
        return frozenset(seen)

    @functools.lru_cache(maxsize=None)
    def depth(self, wnid: str) -> int:
        """Length of the longest is-a path from a root (roots have depth 0)."""
        parents = self._parents.get(wnid, ())
        return 0 if not parents else 1 + max(self.depth(p) for p in parents)

    def lowest_common_ancestor(self, a: str, b: str) -> str | None:
        """The deepest synset that is (or is an ancestor of) both a and b."""
        common = (self.ancestors(a) | {a}) & (self.ancestors(b) | {b})
        if not common:
            return None
        return max(sorted(common), key=self.depth)

    def descendant_classes(self, root_wnid: str) -> np.ndarray:
        """Indices of the ImageNet classes that are ``root_wnid`` or below it."""
        wnids = imagenet_wnids()
        return np.array([i for i, w in enumerate(wnids)
                         if w == root_wnid or root_wnid in self.ancestors(w)], dtype=np.int64)


@functools.lru_cache(maxsize=1)
def load_hierarchy() -> WordNetHierarchy:
    with open(sources.fetch("wordnet_hierarchy"), encoding="utf-8") as f:
        edges = [(parts[0], parts[1]) for parts in map(str.split, f) if len(parts) == 2]
    return WordNetHierarchy(edges, lambda: _read_tab_table(sources.fetch("wordnet_names")))


@functools.lru_cache(maxsize=1)
def _class_subsets() -> dict[str, np.ndarray]:
    hierarchy = load_hierarchy()
    dogs = hierarchy.descendant_classes(DOG_WNID)
    organisms = hierarchy.descendant_classes(ORGANISM_WNID)
    objects = np.setdiff1d(np.arange(NUM_CLASSES), organisms)
    return {"dogs": dogs, "organisms": organisms, "objects": objects}


def class_subsets() -> dict[str, np.ndarray]:
    """Shankar et al.'s subsets as class-index arrays: dogs, organisms, objects."""
    return {k: v.copy() for k, v in _class_subsets().items()}
