"""Image readers that shard across Beam workers, and decoding with a counted quarantine.

Sources (``ImageSource``): a random-access list of encoded images, each with a
unique ``file_name``, a ``source_index`` (its position in the source) and an
original label (-1 where unknown):

* ``ImageFiles``: an image folder, either the ImageNet validation layout (flat
  JPEGs + an optional labels file) or class sub-folders (folder name = wnid or
  ImageNet class name), or explicit files. Files are sorted by file name, so
  ``source_index`` is the position in the sorted file order.
* ``TfdsImages``: a prepared TFDS dataset (e.g. ``imagenet2012`` validation from the
  manual download). array_record datasets are read by random access
  (``builder.as_data_source``), so a shard is an index range and workers read
  disjoint ranges; tfrecord datasets need TensorFlow and are read by split slices.
  TFDS stores examples in a shuffled order: the final predictions are re-sorted by
  file name (``auditing.predictions.concatenate_sorted``).

A run is split into ``Shard``s (index ranges): ``ReadImageShards`` turns shards into
``ImageRecord``s on the workers and ``DecodeImages`` decodes them with PIL. An image
that cannot be decoded is quarantined: it is counted and goes on as
``(ImageKey with quarantine_reason, None)`` in the same PCollection, so that images
read = decoded + quarantined can be checked per shard downstream without a Flatten
(local runners materialise a Flatten, which would hold every result back until the
whole data set was predicted).
"""
from __future__ import annotations

from auditing.errors import InputError
import abc
import dataclasses
import functools
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm"})
UNKNOWN_LABEL = -1
METRICS_NAMESPACE = "label_audit.images"
QUARANTINED = "quarantined"
# Records fetched from a TFDS data source per call: bounds the memory of one read.
_TFDS_READ_CHUNK = 64


class ImageSourceError(InputError):
    """An image folder, labels file or dataset that cannot be read as asked."""


class UndecodableImage(ValueError):
    """The bytes are not a complete image PIL can decode."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One encoded image as read from a source, before decoding."""

    file_name: str
    source_index: int
    label: int
    shard_index: int
    encoded: bytes


class ImageKey(NamedTuple):
    """What travels with a decoded image through the model, to name its prediction."""

    file_name: str
    source_index: int
    label: int
    shard_index: int
    # Why the image could not be decoded; None for a decoded image.
    quarantine_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Shard:
    """Images [start, stop) of a source: the unit of work and of the per-shard files."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    """Contiguous shards of at most ``shard_size`` images (at least one shard)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    count = max(1, -(-num_images // shard_size))
    return [Shard(i, count, i * shard_size, min(num_images, (i + 1) * shard_size))
            for i in range(count)]


class ImageSource(abc.ABC):
    """Random access to encoded images. Must pickle small: it is shipped to workers."""

    # Identifies the image set (e.g. 'imagenet2012-5.1.0'); part of the store path.
    dataset_id: str
    split: str

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> Iterator[tuple[int, str, int, bytes]]:
        """(source_index, file_name, label, encoded bytes) for images [start, stop)."""


# ----------------------------------------------------------------------------- folders


@dataclasses.dataclass(frozen=True)
class ImageFiles(ImageSource):
    """Image files sorted by file name; build with ``from_folder`` or ``from_paths``."""

    paths: tuple[str, ...]
    file_names: tuple[str, ...]
    labels: tuple[int, ...]
    dataset_id: str
    split: str = "all"

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.file_names) == len(self.labels):
            raise ValueError("paths, file_names and labels must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> Iterator[tuple[int, str, int, bytes]]:
        for index in range(start, stop):
            yield index, self.file_names[index], self.labels[index], Path(self.paths[index]).read_bytes()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, labels_path: str | os.PathLike | None = None,
                    split: str = "all", dataset_id: str | None = None) -> "ImageFiles":
        """A flat folder of images (+ optional labels file) or one sub-folder per class.

        ``labels_path`` (flat layout only): a TSV ``file_name<TAB>label`` (read by
        ``auditing.labelsets.read_label_tsv``; images it does not list get label -1), or
        a ``.txt`` with one wnid or class index per line in sorted file order (the
        TFDS wheel's ``validation_labels.txt``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ImageSourceError(f"{folder}: not a folder")
        flat = sorted(p for p in folder.iterdir() if _is_image(p))
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        if flat and class_dirs:
            raise ImageSourceError(
                f"{folder}: holds both image files ({flat[0].name}, ...) and sub-folders "
                f"({class_dirs[0].name}, ...): use a flat folder, or one sub-folder per class")
        if flat or not class_dirs:
            if not flat:
                raise ImageSourceError(f"{folder}: no image files ({sorted(IMAGE_EXTENSIONS)}) "
                                       "and no class sub-folders")
            names = [p.name for p in flat]
            labels = (_labels_from_file(Path(labels_path), names) if labels_path
                      else [UNKNOWN_LABEL] * len(flat))
            return cls._sorted(flat, names, labels, dataset_id or _listing_id(folder.name, flat),
                               split)
        if labels_path:
            raise ImageSourceError(f"{folder}: has class sub-folders, which give the labels; "
                                   f"a labels file ({labels_path}) is only for a flat folder")
        class_index = _class_folder_index([d.name for d in class_dirs], folder)
        files = [(p, class_index[d.name]) for d in class_dirs for p in sorted(d.rglob("*"))
                 if _is_image(p)]
        if not files:
            raise ImageSourceError(f"{folder}: the class sub-folders hold no image files")
        paths = [p for p, _ in files]
        return cls._sorted(paths, _unique_names(paths, folder), [label for _, label in files],
                           dataset_id or _listing_id(folder.name, paths), split)

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike], split: str = "all",
                   dataset_id: str | None = None) -> "ImageFiles":
        """Image files and folders (searched recursively) as given on a command line."""
        files: list[Path] = []
        for given in map(Path, paths):
            if given.is_dir():
                files += sorted(p for p in given.rglob("*") if _is_image(p))
            elif given.is_file():
                files.append(given)
            else:
                raise ImageSourceError(f"{given}: no such file or folder")
        files = list(dict.fromkeys(p.resolve() for p in files))
        if not files:
            raise ImageSourceError(f"no image files in {[str(p) for p in paths]}")
        common = Path(os.path.commonpath([p.parent for p in files]))
        return cls._sorted(files, _unique_names(files, common), [UNKNOWN_LABEL] * len(files),
                           dataset_id or _listing_id(common.name or "images", files), split)

    @classmethod
    def _sorted(cls, paths: Sequence[Path], names: Sequence[str], labels: Sequence[int],
                dataset_id: str, split: str) -> "ImageFiles":
        order = sorted(range(len(names)), key=names.__getitem__)
        return cls(paths=tuple(str(paths[i]) for i in order),
                   file_names=tuple(names[i] for i in order),
                   labels=tuple(int(labels[i]) for i in order), dataset_id=dataset_id, split=split)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _unique_names(paths: Sequence[Path], root: Path) -> list[str]:
    """Base names when they are unique (ImageNet's are), else paths relative to ``root``."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [p.relative_to(root).as_posix() for p in paths]


def _listing_id(stem: str, paths: Sequence[Path]) -> str:
    """``<stem>-<12 hex>`` from the file names and sizes: changes when the image set does."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(f"{p.name}\t{p.stat().st_size}\n".encode())
    return f"{stem}-{digest.hexdigest()[:12]}"


def _labels_from_file(path: Path, file_names: Sequence[str]) -> list[int]:
    from auditing import labelsets
    from auditing.imagenet import imagenet_wnids

    if path.suffix.lower() == ".txt":  # one label per line, in sorted file order
        lines = path.read_text().split()
        if len(lines) != len(file_names):
            raise ImageSourceError(f"{path}: {len(lines)} labels for {len(file_names)} images; a "
                                   ".txt labels file has one label per image in sorted file order")
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        labels = []
        for row, value in enumerate(lines, start=1):
            if value not in index and not value.isdigit():
                raise ImageSourceError(f"{path}: row {row}: {value!r} is neither a wnid nor a "
                                       "class index")
            labels.append(index[value] if value in index else int(value))
        return labels
    by_name = dict(labelsets.read_label_tsv(path).itertuples(index=False))
    return [int(by_name.get(name, UNKNOWN_LABEL)) for name in file_names]


def _class_folder_index(folder_names: Sequence[str], root: Path) -> dict[str, int]:
    """Class index of each class folder, named by wnid or by ImageNet class name."""
    from auditing.imagenet import imagenet_wnids

    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    if all(name in wnid_index for name in folder_names):
        return {name: wnid_index[name] for name in folder_names}
    from auditing.imagenet import load_classes

    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(load_classes().names):
        by_name.setdefault(_normalise_class_name(name), []).append(i)
    index = {}
    for name in folder_names:
        if name in wnid_index:
            index[name] = wnid_index[name]
            continue
        matches = by_name.get(_normalise_class_name(name), [])
        if len(matches) != 1:
            problem = "names several ImageNet classes" if matches else "is neither an ImageNet wnid nor a class name"
            raise ImageSourceError(f"{root / name}: class folder {name!r} {problem}; name it by wnid")
        index[name] = matches[0]
    return index


def _normalise_class_name(name: str) -> str:
    return name.strip().lower().replace("_", " ")


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass(frozen=True)
class TfdsImages(ImageSource):
    """A prepared TFDS dataset's split; images are read undecoded (decoded by ``DecodeImages``)."""

    name: str
    split: str
    data_dir: str | None = None
    image_key: str = "image"
    file_name_key: str = "file_name"
    label_key: str = "label"

    @property
    def dataset_id(self) -> str:
        info = _tfds_builder(self.name, self.data_dir).info
        return f"{info.name}-{info.version}"

    def __len__(self) -> int:
        splits = _tfds_builder(self.name, self.data_dir).info.splits
        try:
            return splits[self.split].num_examples
        except (KeyError, ValueError):  # ValueError: a sliced split naming an unknown split
            raise ImageSourceError(f"TFDS {self.name}: no split {self.split!r}; has {list(splits)}") from None

    def read(self, start: int, stop: int) -> Iterator[tuple[int, str, int, bytes]]:
        builder = _tfds_builder(self.name, self.data_dir)
        features = builder.info.features
        if self.image_key not in features:
            raise ImageSourceError(f"TFDS {self.name}: no feature {self.image_key!r}; has {list(features)}")
        for index, example in zip(range(start, stop), self._examples(builder, start, stop)):
            name = (_text(example[self.file_name_key]) if self.file_name_key in features
                    else f"{self.split}-{index:08d}")
            label = int(example[self.label_key]) if self.label_key in features else UNKNOWN_LABEL
            yield index, name, label, bytes(example[self.image_key])

    def _examples(self, builder: Any, start: int, stop: int) -> Iterator[dict[str, Any]]:
        import tensorflow_datasets as tfds

        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            source = _tfds_data_source(self.name, self.data_dir, self.split, self.image_key)
            for chunk in range(start, stop, _TFDS_READ_CHUNK):
                yield from source.__getitems__(list(range(chunk, min(stop, chunk + _TFDS_READ_CHUNK))))
            return
        # tfrecord: sequential files, read by split slice (needs TensorFlow).
        if "[" in self.split:
            raise ImageSourceError(f"TFDS {self.name}: a sliced split ({self.split}) cannot be "
                                   "sharded for a tfrecord dataset; use the whole split")
        dataset = builder.as_dataset(split=f"{self.split}[{start}:{stop}]", decoders=decoders,
                                     shuffle_files=False)
        yield from tfds.as_numpy(dataset)


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for "not found / not prepared"
        raise ImageSourceError(f"TFDS dataset {name!r} not found in data_dir {data_dir}: {e}") from e


@functools.lru_cache(maxsize=8)
def _tfds_data_source(name: str, data_dir: str | None, split: str, image_key: str) -> Any:
    """One random-access reader per process and split (opening one reads the index)."""
    import tensorflow_datasets as tfds

    return _tfds_builder(name, data_dir).as_data_source(
        split, decoders={image_key: tfds.decode.SkipDecoding()})


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_image_source(type: str, *, path: str | None = None, paths: Sequence[str] = (),
                      name: str | None = None, data_dir: str | None = None,
                      split: str = "validation", labels_path: str | None = None) -> ImageSource:
    """The source a config's ``dataset.images`` section names: 'folder', 'files' or 'tfds'."""
    if type == "folder":
        if not path:
            raise ImageSourceError("an image folder source needs a path")
        return ImageFiles.from_folder(path, labels_path=labels_path, split=split)
    if type == "files":
        if not paths:
            raise ImageSourceError("an image files source needs paths")
        return ImageFiles.from_paths(paths, split=split)
    if type == "tfds":
        if not name:
            raise ImageSourceError("a TFDS image source needs a dataset name")
        return TfdsImages(name=name, split=split, data_dir=data_dir)
    raise ImageSourceError(f"unknown image source type {type!r}; expected 'folder', 'files' or 'tfds'")


class EncodedImages(Mapping[str, bytes]):
    """{file_name: encoded bytes} over image files, read only when asked for (the
    report shows a few examples)."""

    def __init__(self, files: ImageFiles):
        self._paths = dict(zip(files.file_names, files.paths))

    def __getitem__(self, name: str) -> bytes:
        return Path(self._paths[name]).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


# ----------------------------------------------------------------------------- transforms


class _ReadShardFn(beam.DoFn):
    def __init__(self, source: ImageSource):
        self._source = source
        self._read = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "read")

    def process(self, shard: Shard) -> Iterator[ImageRecord]:
        for index, file_name, label, encoded in self._source.read(shard.start, shard.stop):
            self._read.inc()
            yield ImageRecord(file_name, index, label, shard.index, encoded)


class ReadImageShards(beam.PTransform):
    """PCollection[Shard] -> PCollection[ImageRecord]; each worker reads whole shards.

    The shards should arrive spread over workers: ``beam.Create`` already reshuffles
    its elements (when there are several), so no second Reshuffle is added here; it
    would cost every run one more stage.
    """

    def __init__(self, source: ImageSource):
        super().__init__()
        self._source = source

    def expand(self, shards: beam.PCollection) -> beam.PCollection:
        return shards | "ReadShard" >> beam.ParDo(_ReadShardFn(self._source))


def decode_image(encoded: bytes) -> Image.Image:
    """Fully decode an image (PIL decodes lazily, so truncation shows only on load)."""
    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
    except Image.UnidentifiedImageError:
        raise UndecodableImage("not an image format PIL recognises") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    return image


class _DecodeFn(beam.DoFn):
    def __init__(self, preprocess: Callable[[Image.Image], np.ndarray]):
        self._preprocess = preprocess
        self._decoded = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "decoded")
        self._quarantined = beam.metrics.Metrics.counter(METRICS_NAMESPACE, QUARANTINED)

    def process(self, record: ImageRecord) -> Iterator[tuple[ImageKey, np.ndarray | None]]:
        key = ImageKey(record.file_name, record.source_index, record.label, record.shard_index)
        try:
            # Mode conversion (grayscale, CMYK, RGBA, palette -> RGB) is the model's
            # preprocess; a mode it cannot convert is an undecodable image too.
            array = self._preprocess(decode_image(record.encoded))
        except (UndecodableImage, OSError, ValueError) as e:
            self._quarantined.inc()
            reason = str(e) if isinstance(e, UndecodableImage) else f"{type(e).__name__}: {e}"
            yield key._replace(quarantine_reason=reason), None
            return
        self._decoded.inc()
        yield key, array


class DecodeImages(beam.PTransform):
    """ImageRecord -> (ImageKey, preprocessed float32 HWC array), or (ImageKey with
    ``quarantine_reason``, None) for an image that cannot be decoded."""

    def __init__(self, preprocess: Callable[[Image.Image], np.ndarray]):
        super().__init__()
        self._preprocess = preprocess

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "DecodeAndPreprocess" >> beam.ParDo(_DecodeFn(self._preprocess))
