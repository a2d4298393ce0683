"""Image readers, shards and decoding with quarantine, on real photos (models.sample_photos)."""
from __future__ import annotations

import functools
import io
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models import sample_photos
from pipelines.beam_options import make_options
from pipelines.images import (METRICS_NAMESPACE, QUARANTINED, DecodeImages, ImageFiles,
                              ImageSourceError, ReadImageShards, TfdsImages, UndecodableImage,
                              decode_image, make_image_source, plan_shards)


def real_jpeg(name: str) -> bytes:
    """A real photo of ``models.sample_photos`` as JPEG bytes: the file itself when it is a JPEG."""
    path = sample_photos.photo_path(name)
    if path.suffix == ".jpg":
        return path.read_bytes()
    return encode(sample_photos.load_photos([name])[name].convert("RGB"), "JPEG")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_and_bad_photos() -> tuple[dict[str, bytes], dict[str, str]]:
    """({file_name: bytes} of every file, {file_name: expected reason fragment} of the bad ones).

    Every good file is a real photo, in the awkward modes a crawl meets (CMYK JPEG,
    RGBA PNG, grayscale); the bad ones are real photos made corrupt, plus noise.
    """
    china = real_jpeg("china")
    files = {
        "astronaut.jpg": real_jpeg("astronaut"),
        "chelsea.jpg": real_jpeg("chelsea"),
        "coffee_cmyk.jpg": encode(Image.open(io.BytesIO(real_jpeg("coffee"))).convert("CMYK"), "JPEG"),
        "flower.jpg": real_jpeg("flower"),
        "rocket_rgba.png": encode(Image.open(io.BytesIO(real_jpeg("rocket"))).convert("RGBA"), "PNG"),
        "camera_gray.png": sample_photos.photo_path("camera").read_bytes(),
        "china_truncated.jpg": china[: len(china) // 2],
        "noise.jpg": np.random.default_rng(0).bytes(5000),
        "empty.jpg": b"",
    }
    bad = {"china_truncated.jpg": "truncated", "noise.jpg": "not an image format",
           "empty.jpg": "not an image format"}
    return files, bad


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_photo_source(folder: Path) -> tuple[ImageFiles, dict[str, str]]:
    """The good and bad photos written to ``folder``, as a source, and the bad ones' reasons."""
    files, bad = good_and_bad_photos()
    return ImageFiles.from_folder(write_files(folder, files)), bad


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    files, bad = good_and_bad_photos()
    return write_files(tmp_path_factory.mktemp("photos"), files), bad


def tiny_preprocess(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- decode


def test_decode_converts_awkward_modes_and_rejects_corrupt_files(photo_folder):
    folder, bad = photo_folder
    modes = {}
    for path in sorted(folder.iterdir()):
        if path.name in bad:
            with pytest.raises(UndecodableImage, match=bad[path.name]):
                decode_image(path.read_bytes())
        else:
            modes[path.name] = decode_image(path.read_bytes()).mode
    assert modes == {"astronaut.jpg": "RGB", "chelsea.jpg": "RGB", "coffee_cmyk.jpg": "CMYK",
                     "flower.jpg": "RGB", "rocket_rgba.png": "RGBA", "camera_gray.png": "L"}


def test_decode_images_quarantines_and_counts(photo_folder):
    folder, bad = photo_folder
    source = ImageFiles.from_folder(folder)
    pipeline = BeamTestPipeline(options=make_options())
    records = (pipeline | beam.Create(plan_shards(len(source), 4)) | ReadImageShards(source))
    decoded = records | DecodeImages(tiny_preprocess)
    assert_that(decoded | beam.MapTuple(_decode_outcome),
                equal_to([(n, "quarantined", bad[n]) if n in bad else (n, (8, 8, 3), None)
                          for n in source.file_names]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]}
    assert counters == {"read": 9, "decoded": 6, QUARANTINED: 3}
    assert counters["read"] == counters["decoded"] + counters[QUARANTINED]


def _decode_outcome(key, array):
    """(file name, array shape or 'quarantined', the expected reason found in the actual one)."""
    if array is None:
        expected = next(r for r in ("truncated", "not an image format") if r in key.quarantine_reason)
        return key.file_name, "quarantined", expected
    return key.file_name, array.shape, key.quarantine_reason


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("num_images, shard_size", [(10, 3), (9, 3), (1, 1000), (0, 5)])
def test_plan_shards_covers_every_image_once(num_images, shard_size):
    shards = plan_shards(num_images, shard_size)
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert covered == list(range(num_images))
    assert all(s.count == len(shards) and 0 < s.size <= shard_size for s in shards if num_images)
    assert shards[-1].name == f"shard-{len(shards) - 1:05d}-of-{len(shards):05d}"


def test_read_image_shards_reads_disjoint_ranges(photo_folder):
    folder, _ = photo_folder
    source = ImageFiles.from_folder(folder)
    with BeamTestPipeline(options=make_options()) as pipeline:
        records = (pipeline | beam.Create(plan_shards(len(source), 2)) | ReadImageShards(source))
        assert_that(records | beam.Map(lambda r: (r.source_index, r.file_name, r.shard_index,
                                                  len(r.encoded))),
                    equal_to([(i, n, i // 2, (folder / n).stat().st_size)
                              for i, n in enumerate(source.file_names)]))


# ----------------------------------------------------------------------------- folders


def test_flat_folder_is_sorted_with_labels_from_the_real_tsv(tmp_path, shared_data):
    tsv = shared_data / "derived" / "imagenet_val_labels_by_filename.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    # Real photos under real ImageNet validation names, written in a shuffled order.
    chosen = [rows[k] for k in (41206, 0, 17, 3)]
    for (name, _, _), photo in zip(chosen, ["astronaut", "chelsea", "coffee", "rocket"]):
        (tmp_path / name).write_bytes(real_jpeg(photo))
    (tmp_path / "not_listed.jpg").write_bytes(real_jpeg("china"))
    (tmp_path / "notes.txt").write_text("not an image")

    source = ImageFiles.from_folder(tmp_path, labels_path=tsv, split="validation")
    expected = sorted((name, int(label)) for name, label, _ in chosen) + [("not_listed.jpg", -1)]
    assert list(zip(source.file_names, source.labels)) == expected
    assert len(source) == 5 and source.split == "validation"
    (index, name, label, data), = source.read(2, 3)
    assert (index, name, label) == (2, expected[2][0], expected[2][1])
    assert data == (tmp_path / name).read_bytes()


def test_txt_labels_in_sorted_file_order(tmp_path):
    write_files(tmp_path / "images", {"b.jpg": real_jpeg("coffee"), "a.jpg": real_jpeg("chelsea")})
    (tmp_path / "labels.txt").write_text("n02123045\n967\n")  # tabby for a.jpg, espresso for b.jpg
    source = ImageFiles.from_folder(tmp_path / "images", labels_path=tmp_path / "labels.txt")
    assert source.labels == (281, 967)
    (tmp_path / "short.txt").write_text("n02123045\n")
    with pytest.raises(ImageSourceError, match="1 labels for 2 images"):
        ImageFiles.from_folder(tmp_path / "images", labels_path=tmp_path / "short.txt")


def test_class_subfolders_by_wnid(tmp_path):
    write_files(tmp_path / "n07920052", {"x.jpg": real_jpeg("coffee")})  # espresso
    write_files(tmp_path / "n02123045", {"y.jpg": real_jpeg("chelsea")})  # tabby
    source = ImageFiles.from_folder(tmp_path)
    assert list(zip(source.file_names, source.labels)) == [("x.jpg", 967), ("y.jpg", 281)]
    first_id = source.dataset_id
    (tmp_path / "n02123045" / "z.jpg").write_bytes(real_jpeg("astronaut"))
    assert ImageFiles.from_folder(tmp_path).dataset_id != first_id  # the image set changed


def test_class_subfolders_by_name_and_bad_names(tmp_path, shared_data):
    write_files(tmp_path / "ok" / "espresso", {"a.jpg": real_jpeg("coffee")})
    write_files(tmp_path / "ok" / "Egyptian_cat", {"a.jpg": real_jpeg("chelsea")})
    source = ImageFiles.from_folder(tmp_path / "ok")
    # Base names repeat across classes, so the names are relative paths.
    assert list(zip(source.file_names, source.labels)) == [("Egyptian_cat/a.jpg", 285),
                                                           ("espresso/a.jpg", 967)]
    write_files(tmp_path / "ambiguous" / "crane", {"a.jpg": real_jpeg("rocket")})
    with pytest.raises(ImageSourceError, match="'crane' names several ImageNet classes"):
        ImageFiles.from_folder(tmp_path / "ambiguous")
    write_files(tmp_path / "unknown" / "teapots", {"a.jpg": real_jpeg("coffee")})
    with pytest.raises(ImageSourceError, match="'teapots' is neither an ImageNet wnid"):
        ImageFiles.from_folder(tmp_path / "unknown")


def test_from_paths_mixes_files_and_folders(photo_folder, tmp_path):
    folder, _ = photo_folder
    single = write_files(tmp_path, {"astronaut.jpg": real_jpeg("astronaut")}) / "astronaut.jpg"
    source = ImageFiles.from_paths([folder / "chelsea.jpg", folder, single])
    assert len(source) == 10  # chelsea.jpg is listed twice but read once
    # Two files are called astronaut.jpg, so names are paths below the common folder.
    assert {f"{folder.name}/chelsea.jpg", f"{folder.name}/astronaut.jpg",
            f"{tmp_path.name}/astronaut.jpg"} <= set(source.file_names)
    assert list(source.file_names) == sorted(source.file_names)
    with pytest.raises(ImageSourceError, match="no such file"):
        ImageFiles.from_paths([tmp_path / "missing.jpg"])


def test_make_image_source_kinds(photo_folder, tmp_path):
    folder, _ = photo_folder
    assert len(make_image_source("folder", path=str(folder))) == 9
    files = make_image_source("files", paths=[str(folder / "chelsea.jpg"), str(folder / "flower.jpg")])
    assert files.file_names == ("chelsea.jpg", "flower.jpg")
    with pytest.raises(ImageSourceError, match="unknown image source type 'hdf5'"):
        make_image_source("hdf5", path=str(tmp_path))
    with pytest.raises(ImageSourceError, match="no image files"):
        make_image_source("folder", path=str(tmp_path))


# ----------------------------------------------------------------------------- TFDS


class LabelAuditTinyPhotos(tfds.core.GeneratorBasedBuilder):
    """Real photos (one corrupt) as a TFDS image-classification dataset."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i, (name, data) in enumerate(tfds_photos().items()):
            yield name, {"image": data, "label": 100 + i, "file_name": name}


@functools.lru_cache(maxsize=1)
def tfds_photos() -> dict[str, bytes]:
    # Bad bytes are written straight into the record: TFDS stores encoded images as given.
    photos = {f"photo_{i:02d}.jpg": real_jpeg(name) for i, name in enumerate(
        ["astronaut", "chelsea", "coffee", "rocket", "china", "flower", "astronaut"])}
    photos["photo_07.jpg"] = real_jpeg("china")[:20000]
    return photos


def tiny_photos_label(file_name: str) -> int:
    return 100 + sorted(tfds_photos()).index(file_name)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    LabelAuditTinyPhotos(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_array_record_source_reads_disjoint_ranges(tfds_dir):
    source = TfdsImages("label_audit_tiny_photos", "validation", data_dir=tfds_dir)
    assert len(source) == 8 and source.dataset_id == "label_audit_tiny_photos-1.0.0"
    _check_reads_every_photo_once(source)


def _check_reads_every_photo_once(source: TfdsImages) -> None:
    rows = [row for s in plan_shards(len(source), 3) for row in source.read(s.start, s.stop)]
    assert [r[0] for r in rows] == list(range(8))
    photos = tfds_photos()
    assert sorted(r[1] for r in rows) == sorted(photos)  # every image exactly once
    assert all(data == photos[name] and label == tiny_photos_label(name)
               for _, name, label, data in rows)


def test_tfds_source_in_a_pipeline(tfds_dir):
    source = make_image_source("tfds", name="label_audit_tiny_photos", data_dir=tfds_dir)
    with BeamTestPipeline(options=make_options()) as pipeline:
        decoded = (pipeline | beam.Create(plan_shards(len(source), 3)) | ReadImageShards(source)
                   | DecodeImages(tiny_preprocess))
        assert_that(decoded | beam.MapTuple(lambda key, array: (key.file_name, key.label, array is None)),
                    equal_to([(n, tiny_photos_label(n), n == "photo_07.jpg") for n in tfds_photos()]))


def test_tfds_missing_dataset_or_split(tfds_dir, tmp_path):
    with pytest.raises(ImageSourceError, match="no split 'train'"):
        len(TfdsImages("label_audit_tiny_photos", "train", data_dir=tfds_dir))
    with pytest.raises(ImageSourceError, match="not found"):
        len(TfdsImages("no_such_dataset_here", "validation", data_dir=str(tmp_path)))


def test_tfds_tfrecord_source(tmp_path):
    pytest.importorskip("tensorflow", reason="tfrecord datasets are read with TensorFlow (extra 'tf')")
    LabelAuditTinyPhotos(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    builder = tfds.builder("label_audit_tiny_photos", data_dir=str(tmp_path))
    assert builder.info.file_format == tfds.core.FileFormat.TFRECORD  # read by split slices
    _check_reads_every_photo_once(TfdsImages("label_audit_tiny_photos", "validation", data_dir=str(tmp_path)))


def test_folder_with_loose_images_and_class_folders_is_refused(tmp_path):
    from pipelines.images import ImageFiles, ImageSourceError

    Image.new("RGB", (8, 8)).save(tmp_path / "preview.jpg")
    (tmp_path / "n01440764").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "n01440764" / "a.jpg")
    with pytest.raises(ImageSourceError, match="both image files .* and sub-folders"):
        ImageFiles.from_folder(tmp_path)
