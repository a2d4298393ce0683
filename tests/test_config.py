"""Config validation: typed objects, and errors that name the key or path."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audit.yaml"
    path.write_text(text)
    return path


MINIMAL = """
output_dir: out
stages:
  aggregate: {method: majority-vote, threshold: 0.5}
"""


def test_minimal_config_resolves_output_dir_relative_to_the_file(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.output_dir == str(tmp_path / "out")
    assert config.stages.aggregate.method == "majority-vote"
    assert config.stages.release is None
    assert config.runner.name == "direct"


def test_out_flag_overrides_output_dir(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL), output_dir=str(tmp_path / "elsewhere"))
    assert config.output_dir == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("text, expected", [
    ("output_dir: o\nstages: {aggregate: {methd: glad}}", r"stages\.aggregate\.methd: unknown key"),
    ("output_dir: o\nstages: {aggregate: {method: em}}", r"stages\.aggregate\.method: Input should be"),
    ("output_dir: o\nstages: {aggregate: {threshold: high}}", r"stages\.aggregate\.threshold"),
    ("output_dir: o\nstages: {tasks: {max_labels: 0}}", r"stages\.tasks\.max_labels"),
    ("output_dir: o\nstages: {release: {version: one}}", r"stages\.release\.version"),
    ("output_dir: o\nstages: {votes: {}}", r"stages\.votes: Value error, votes needs paths"),
    ("output_dir: o\nstages: {aggregate: {params: {shrinkge: 0.3}}}",
     r"stages\.aggregate: .*params\.shrinkge: unknown parameter 'shrinkge' for aggregation method "
     r"'dawid-skene'; valid: .*shrinkage"),
    ("output_dir: o\nstages: {aggregate: {method: gold-confusion, params: {smoothing: -1}}}",
     r"params\.smoothing: parameter 'smoothing' of aggregation method 'gold-confusion'"),
    ("output_dir: o\nstages: {votes: {paths: [v.csv], gold: {raters: [g.csv]}}}",
     r"gold needs exactly one of experts"),
    ("stages: {}", r"output_dir: Field required"),
    ("output_dir: o\nstagez: {}", r"stagez: unknown key"),
    ("- just\n- a list", r"expected a mapping"),
    ("output_dir: [unclosed", r"not valid YAML"),
])
def test_bad_configs_name_the_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_input_file_names_the_key_and_the_path(tmp_path):
    path = _write(tmp_path, "output_dir: o\nstages: {votes: {paths: [nowhere.csv]}}")
    with pytest.raises(ConfigError, match=r"stages\.votes\.paths\[0\]: file not found: .*nowhere\.csv"):
        load_config(path)


def test_unknown_pinned_source_is_a_config_error(tmp_path):
    path = _write(tmp_path, "output_dir: o\nstages: {votes: {paths: ['source:nope']}}")
    with pytest.raises(ConfigError, match=r"stages\.votes\.paths\[0\]: .*unknown source 'nope'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/audit.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate_and_plan_every_declared_stage(name, shared_data):
    from pipelines.run import plan

    config = load_config(REPO / "configs" / name)
    declared = ["dataset"] + [key for key, section in config.stages if section is not None]
    planned = [stage.name for stage in plan(config)]
    # Every declared section runs (select_subset pools through propose even undeclared).
    assert set(declared) <= set(planned) <= set(declared) | {"propose"}
    assert planned[0] == "dataset" and len(planned) >= 2


def test_rater_history_only_with_dawid_skene(tmp_path):
    path = _write(tmp_path, "output_dir: o\nstages: {aggregate: {method: majority-vote, "
                            "rater_history: 'source:real_raters'}}")
    with pytest.raises(ConfigError, match=r"stages\.aggregate: Value error, rater_history is a dawid-skene"):
        load_config(path, check_files=False)


def test_a_parameter_typo_exits_2_before_any_stage_runs(tmp_path, capsys):
    from pipelines import cli

    path = _write(tmp_path, "output_dir: out\nstages:\n  votes: {paths: ['source:real_raters']}\n"
                            "  aggregate: {params: {shrinkge: 0.3}}\n")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "shrinkge" in err and "valid:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
