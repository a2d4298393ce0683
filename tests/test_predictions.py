"""auditing.predictions' top-1 CSV reader: Arrow's typed read and the text read (the
fallback that names bad lines) give the same predictions."""
from __future__ import annotations

import numpy as np
import pytest

from auditing import predictions


def _same(a: predictions.Predictions, b: predictions.Predictions) -> bool:
    return (a.file_names.dtype == b.file_names.dtype and a.file_names.tolist() == b.file_names.tolist()
            and a.top1.dtype == b.top1.dtype == np.int64 and a.top1.tolist() == b.top1.tolist())


@pytest.mark.parametrize("model", ["ResNet50", "SimCLR"])
def test_typed_read_equals_text_read_on_published_csv(shared_data, model):
    path = shared_data / "imagenetx_predictions" / f"{model}.csv"
    typed = predictions.read_top1_csv(path)
    assert typed.num_images == 50_000
    assert _same(typed, predictions._read_top1_csv_text(path, 1000))


@pytest.mark.parametrize("rows", [
    "a.jpg,7,0.5\nb.jpg,0,1\n",                    # typed: Arrow reads it
    " a.jpg ,7,0.5\n\"b.jpg\",0,1.0\n",            # names padded or quoted: stripped either way
    "a.jpg,7.0,0.5\nb.jpg,0,1\n",                  # a class written "7.0": the text read accepts it
])
def test_oddly_written_valid_csv_reads_the_same_either_way(tmp_path, rows):
    path = tmp_path / "top1.csv"
    path.write_text("file_name,predicted_class,predicted_probability\n" + rows)
    read = predictions.read_top1_csv(path)
    assert read.file_names.tolist() == ["a.jpg", "b.jpg"] and read.top1.tolist() == [7, 0]
    assert _same(read, predictions._read_top1_csv_text(path, 1000))
