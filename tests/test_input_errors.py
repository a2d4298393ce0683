"""The input-error contract: every error caused by the user's input exits 2 with one or
two lines naming the file / key / model, never a traceback; before any stage runs."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines import cli


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_an_unknown_model_suggests_the_closest_names(tmp_path, capsys):
    assert cli.main(["predict", "--model", "efficientnet-lite9", "--images", str(tmp_path), "--out",
                     str(tmp_path / "p.npz")]) == 2
    err = _err(capsys)
    assert "unknown model 'efficientnet-lite9'; did you mean 'efficientnet-lite2'" in err
    assert len(err.strip().splitlines()) <= 2


def test_timm_spelling_of_a_model_is_accepted():
    from models.registry import get_model

    assert get_model("efficientnet_lite0").name == get_model("tf_efficientnet_lite0").name == "efficientnet-lite0"


def test_a_bad_report_predictions_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, file_names=np.array(["a.jpg"]), top1=np.array([1.5]))  # top-1 must be integers
    (tmp_path / "real.json").write_text("[[1]]")
    (tmp_path / "labels.tsv").write_text("file_name\tlabel\nILSVRC2012_val_00000001.JPEG\t1\n")
    code = cli.main(["report", "--labels", str(tmp_path / "real.json"), "--original-labels",
                     str(tmp_path / "labels.tsv"), "--predictions", f"bad={bad}", "--no-model-zoo",
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert str(bad) in _err(capsys)


@pytest.mark.parametrize("yaml_text, expected", [
    ("output_dir: o\nstages: {aggregate: {params: {shrinkge: 0.3}}}", "shrinkge"),
    ("output_dir: o\nstages: {sensitivity: {models: [efficientnet-lite0], transforms: [{spin: 3}]}}", "spin"),
    ("output_dir: o\nstages: {tasks: {}}", "stages.tasks needs proposals"),
    ("output_dir: o\ninputs: {votes: v.csv}\nstages: {}", "inputs.votes"),
])
def test_config_errors_exit_2_before_anything_runs(tmp_path, capsys, yaml_text, expected):
    (tmp_path / "v.csv").write_text("file_name,label,rater_id,answer\n")
    config = tmp_path / "audit.yaml"
    config.write_text(yaml_text)
    assert cli.main(["run", str(config)]) == 2
    assert expected in _err(capsys)
    assert not (tmp_path / "o").exists()
