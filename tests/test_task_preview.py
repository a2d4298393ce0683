"""auditing.task_labels + pipelines.task_preview: the tasks as a rater sees them, on real
ImageNet validation images, their ReaL questions and real class example images."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from auditing import imagenet, sources, task_labels, tasks
from pipelines import task_preview

N_IMAGES = 3


@pytest.fixture(scope="module")
def real_tasks(shared_data, tmp_path_factory):
    """Tasks built from the ReaL questions of the first 3 sample images the raters saw,
    with example images from imagenet_class_examples/, written as tasks.jsonl."""
    images = shared_data / "imagenet_val_sample" / "images"
    with np.load(sources.fetch("real_raters", download=False)) as raters:
        info = raters["info"]
    questions = pd.DataFrame({"file_name": info[:, 0], "label": info[:, 1].astype(np.int64)})
    sample = sorted(p.name for p in images.iterdir())
    rated = sorted(set(questions["file_name"]) & set(sample))[:N_IMAGES]
    proposals = questions[questions["file_name"].isin(rated)].drop_duplicates()
    built = tasks.build_tasks(proposals)
    classes = imagenet.load_classes()
    examples_dir = shared_data / "imagenet_class_examples"
    examples = task_labels.examples_by_class((p.name for p in examples_dir.iterdir()), classes)
    records = task_labels.with_example_images(tasks.task_records(built, classes=classes), examples)
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"path": path, "records": records, "images": images, "examples": examples_dir,
            "proposals": proposals}


def test_every_label_carries_name_gloss_and_a_real_example(real_tasks, shared_data):
    classes = imagenet.load_classes()
    labels = [label for r in real_tasks["records"] for label in r["labels"]]
    assert len(labels) == len(real_tasks["proposals"])  # every question is in one task
    for label in labels:
        assert label["name"] == classes.names[label["index"]] and label["gloss"]
        assert label["example_image"].startswith(classes.wnids[label["index"]] + "_")
        assert (real_tasks["examples"] / label["example_image"]).is_file()
    tench = task_labels.label_info(0, classes, task_labels.examples_by_class(
        ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG"], classes))
    assert (tench.name, tench.example_image) == ("tench", "n01440764_tench.JPEG")
    assert tench.gloss.startswith("freshwater dace-like game fish")
    with pytest.raises(task_labels.ExamplesFolderError, match="readme.txt: an example's name must start"):
        task_labels.examples_by_class(["readme.txt"], classes)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (make system-deps / apt-get install chromium)")


def _headless(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", *flags],
                          capture_output=True, text=True, timeout=120)


def test_preview_pages_render_in_headless_chromium(real_tasks, tmp_path, capsys):
    from PIL import Image

    parser = argparse.ArgumentParser()
    task_preview.add_arguments(parser)
    out = tmp_path / "preview"
    assert task_preview.main(parser.parse_args([str(real_tasks["path"]), "--images", str(real_tasks["images"]),
                                                "--examples", str(real_tasks["examples"]),
                                                "--out", str(out)])) == 0
    records = real_tasks["records"]
    assert f"wrote {len(records)} task page(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{r['task_id']}.html" for r in records]
                                                           + ["index.html"])
    record = max(records, key=lambda r: len(r["labels"]))
    page = out / f"{record['task_id']}.html"
    html = page.read_text()
    assert not re.search(r"<(script|link)\b", html, re.I)
    # The browser's DOM: the image to rate, one example and three answers per label.
    dom = _headless(tmp_path, "--dump-dom", page.resolve().as_uri()).stdout
    n = len(record["labels"])
    assert dom.count('src="data:image/jpeg;base64,') == 1 + n
    assert len(re.findall(r'<input type="radio"', dom)) == 3 * n
    for label in record["labels"]:
        assert label["name"] in dom
        for value in ("yes", "maybe", "no"):
            assert f'name="label-{label["index"]}" value="{value}"' in dom
    png = tmp_path / "task.png"
    _headless(tmp_path, f"--screenshot={png}", "--window-size=1100,900", page.resolve().as_uri())
    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float64)
    assert pixels.shape == (900, 1100, 3)
    # The photo occupies the top left (x 24..444): a real photograph, not a blank box.
    photo = pixels[140:500, 30:440]
    assert photo.std() > 25 and (np.abs(photo[..., 0] - photo[..., 2]) > 10).mean() > 0.05


def test_page_escapes_what_it_prints(tmp_path):
    record = {"task_id": "t<1>", "file_name": "a&b.JPEG",
              "labels": [{"index": 0, "name": "<b>tench</b>", "gloss": "fish & chips", "lemmas": "x",
                          "example_image": None}]}
    html = task_labels.render_task_page(record, image=None, example_images={})
    assert "&lt;b&gt;tench&lt;/b&gt;" in html and "fish &amp; chips" in html and "<b>tench" not in html
    assert "could not be read" in html and "no example" in html
