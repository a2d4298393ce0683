"""Where public reference files come from: a local copy, else a pinned download.

Every file the pipeline reads by name (the ReaL votes, the WordNet hierarchy, the
ImageNet class lemmas...) is declared once in ``SOURCES`` with its public URL at a
pinned commit, its size and its sha256, as TFDS's ``checksums.tsv`` does.

``fetch(name)`` looks, in order, in ``$LABEL_AUDIT_DATA`` and in ``shared/data``
beside the checkout (where CI and developers have the files), then in the download
cache (``$LABEL_AUDIT_CACHE`` or ``~/.cache/label-audit``); only then does it
download (pipelines/download.py: the network is not this layer's), and a download
whose sha256 does not match is deleted and refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from auditing.errors import InputError

_REAL = "https://raw.githubusercontent.com/google-research/reassessed-imagenet/bcd006fe12e929f055e0ec7fe39dbf4d64a6881a"
_TIMM = "https://raw.githubusercontent.com/huggingface/pytorch-image-models/aa4b5850c1543fa488abf260f18390eda46cf85d"
_BREEDS = "https://raw.githubusercontent.com/MadryLab/BREEDS-Benchmarks/f83be509107e89f41dde0e4e8e7f8be051fbb891"
_ERRORS = "https://raw.githubusercontent.com/cgnorthcutt/label-errors/f1fed8de216177b107ce68ed20a46887c59fc829"
_IMAGENETX = ("https://raw.githubusercontent.com/facebookresearch/imagenetx/"
              "6403d41a5cc435543a63060e336bc2452e3ad223/model_predictions/base")
_ACUITY = "https://raw.githubusercontent.com/VeriSilicon/acuity-dataset/aded2e9f22cd8fe0745aa57356c68cb95457aad9"


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned public file. ``path`` is its place under the data root."""

    path: str
    url: str
    sha256: str


SOURCES: dict[str, Source] = {
    "real_raters": Source(
        "reassessed_imagenet/raters.npz", f"{_REAL}/raters.npz",
        "d3ffe8082e4e61e9716cbc93a7a4e877e3b1d1240032a176e797b43f19107ec8"),
    "real_scores": Source(
        "reassessed_imagenet/scores.npz", f"{_REAL}/scores.npz",
        "c4b558569f3da12945c57684294f439214a9cb7919b0ae5b44432bd077d03b79"),
    # The golden questions: 5 experts' answers, and 78 crowd raters' answers to them.
    "real_golden": Source(
        "reassessed_imagenet/golden.npz", f"{_REAL}/golden.npz",
        "738a795e88351799934669ac48bb70e2ebe484b447fc3e09e0c36fbd987d06d2"),
    "real_raters_golden": Source(
        "reassessed_imagenet/raters_golden.npz", f"{_REAL}/raters_golden.npz",
        "6fd910fc7389c3d695ac5e18269689797d0246a378c536e218854f9d93bc8ea6"),
    "real_labels": Source(
        "reassessed_imagenet/real.json", f"{_REAL}/real.json",
        "d83e9bff374c631aae8439eb064c7019acc56e1b3bc3f56b8380c2a710b0220b"),
    "imagenet_synsets": Source(
        "timm/imagenet_synsets.txt", f"{_TIMM}/timm/data/_info/imagenet_synsets.txt",
        "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15"),
    "synset_lemmas": Source(
        "timm/imagenet_synset_to_lemma.txt", f"{_TIMM}/timm/data/_info/imagenet_synset_to_lemma.txt",
        "1b8babda187421a4bde0c9c5a197c36f6bdda962f7ca11ffb2813806cbb2178f"),
    "synset_glosses": Source(
        "timm/imagenet_synset_to_definition.txt",
        f"{_TIMM}/timm/data/_info/imagenet_synset_to_definition.txt",
        "191e227d48fc8c7b7e2d2a3cac41fc8b2eb517d9d2819d0edbc91c5767250eed"),
    "timm_results_real": Source(
        "timm/results-imagenet-real.csv", f"{_TIMM}/results/results-imagenet-real.csv",
        "e94696aed665475e4d0235195733775c5e1b3f36d6f5f7de99f4386e7ed11630"),
    "timm_results": Source(
        "timm/results-imagenet.csv", f"{_TIMM}/results/results-imagenet.csv",
        "30972bf7c7ab451bbd4480ec6116b13d0a84441c57bbc946896fd312264acfcd"),
    "wordnet_hierarchy": Source(
        "breeds/wordnet/class_hierarchy.txt",
        f"{_BREEDS}/imagenet_class_hierarchy/wordnet/class_hierarchy.txt",
        "ff7206572ae989d1de8acbd6cbd921854fefd32dcdcb50eab11b81e797e28cd1"),
    "wordnet_names": Source(
        "breeds/wordnet/node_names.txt", f"{_BREEDS}/imagenet_class_hierarchy/wordnet/node_names.txt",
        "55df3c6ee75859de344e2834ef65d88d61cec389d57e787be59e942c9b73e9aa"),
    "label_errors_predictions": Source(
        "label_errors/imagenet_val_set_pyx_argmax_predicted_labels.npy",
        f"{_ERRORS}/cross_validated_predicted_labels/imagenet_val_set_pyx_argmax_predicted_labels.npy",
        "015c76ead98770e56a2db5f3265d7e28a0fee3481897c93301de773e60a8cb73"),
    "label_errors_index": Source(
        "label_errors/imagenet_val_set_index_to_filepath.json",
        f"{_ERRORS}/dataset_indexing/imagenet_val_set_index_to_filepath.json",
        "3289890d9df0484bacb4b519d460eb8dc2fbd009661f82ee8bbcce96e057f126"),
    # Published top-1 predictions of four models on the 50,000 validation images (ImageNet-X).
    "imagenetx_resnet50": Source("imagenetx_predictions/ResNet50.csv", f"{_IMAGENETX}/ResNet50.csv",
                                 "313b702ffb5c7dc3a97b1d5caf23c7190d1633039ba0cf5c0399c256e7a35f15"),
    "imagenetx_vit": Source("imagenetx_predictions/ViT.csv", f"{_IMAGENETX}/ViT.csv",
                            "a9487bc285348f298c389057d039da7a626337a68f9e91f083267dad16e256e4"),
    "imagenetx_dino": Source("imagenetx_predictions/DINO.csv", f"{_IMAGENETX}/DINO.csv",
                             "e46713518b13144daebaadd63a67a0466cb9efc91370b1408c8cb8f38c7bdef4"),
    "imagenetx_simclr": Source("imagenetx_predictions/SimCLR.csv", f"{_IMAGENETX}/SimCLR.csv",
                               "f028b8beb17de3d643e82ff6bdce324a485b05fa5cf9f4cbf1a569c2f993cd19"),
    # 1,300 real validation images (prescaled to 227x227): their list, and the folder.
    "imagenet_val_sample_list": Source("imagenet_val_sample/dataset.txt", f"{_ACUITY}/ILSVRC2012_VAL_SET/dataset.txt",
                                       "dfd3ff33e71a6c5616c4368f7fc600088ca43802ac756288aaafacb6fabdf7dd"),
}

# Folders of many files (images): found locally only; ``url`` says where they come from.
FOLDERS: dict[str, Source] = {
    "imagenet_val_sample": Source("imagenet_val_sample/images", f"{_ACUITY}/ILSVRC2012_VAL_SET/data", ""),
    "imagenet_class_examples": Source(
        "imagenet_class_examples",
        "https://github.com/EliSchwartz/imagenet-sample-images/tree/bc69043e2862758a1906c6a24a792bb28c6bb2ff", ""),
}


class SourceError(InputError):
    """A pinned file is neither local nor downloadable, or its checksum is wrong."""


def data_roots() -> list[Path]:
    """Local folders searched for ``Source.path``, first match wins."""
    roots = []
    if os.environ.get("LABEL_AUDIT_DATA"):
        roots.append(Path(os.environ["LABEL_AUDIT_DATA"]))
    checkout = Path(__file__).resolve().parents[1]
    roots += [checkout.parent / "shared" / "data", checkout / "shared" / "data"]
    return roots


def cache_dir() -> Path:
    return Path(os.environ.get("LABEL_AUDIT_CACHE", Path.home() / ".cache" / "label-audit"))


def shared_data_dir() -> Path | None:
    """The first existing local data root, or None (a user's checkout)."""
    return next((r for r in data_roots() if r.is_dir()), None)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def local_path(name: str) -> Path | None:
    """The local copy of a declared source, without downloading; None if absent."""
    source = SOURCES[name]
    for root in data_roots() + [cache_dir()]:
        candidate = root / source.path
        if candidate.is_file():
            return candidate
    return None


def fetch_folder(name: str) -> Path:
    """The local copy of a declared folder (``FOLDERS``), e.g. the validation sample."""
    folder = FOLDERS[name]
    for root in data_roots() + [cache_dir()]:
        if (root / folder.path).is_dir():
            return root / folder.path
    raise SourceError(f"{name}: no local copy of the folder {folder.path} under "
                      f"{[str(r) for r in data_roots()]}; its files come from {folder.url}")


# The network lives in the pipelines layer (pipelines/download.py registers itself on
# import): this module only declares the files and finds local copies.
_DOWNLOADER: list = []


def register_downloader(download) -> None:
    """``download(name, source, target)`` fetches ``source.url`` into ``target``,
    checked against ``source.sha256``."""
    _DOWNLOADER[:] = [download]


def fetch(name: str, *, download: bool = True) -> Path:
    """Path to the declared source ``name``: local copy, cache, or pinned download."""
    if name in FOLDERS:
        return fetch_folder(name)
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {sorted(SOURCES) + sorted(FOLDERS)}")
    found = local_path(name)
    if found is not None:
        return found
    source = SOURCES[name]
    if not download or not _DOWNLOADER:
        raise SourceError(f"{name}: no local copy of {source.path} under {[str(r) for r in data_roots()]}"
                          + ("" if download else " (download not allowed)"))
    target = cache_dir() / source.path
    _DOWNLOADER[0](name, source, target)
    return target
