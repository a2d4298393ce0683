"""Stage-1 throughput: the Beam pipeline against a bare jitted loop, same model, batch and images.

    python -m benchmarks.inference_throughput [--models efficientnet-lite0 ...] [--images 480]
        [--batch-size 32] [--dtype auto|float32|bfloat16] [--repeats 3]

Images: the real photos of ``models.sample_photos`` (skimage, sklearn), saved as JPEG
files and repeated to ``--images``. Both sides do the same work per image: read the
file, decode and preprocess it with PIL (``spec.preprocess``), run the model in
batches of ``--batch-size``, in one process. The Beam side is ``predict_source`` as
``label-audit predict`` runs it (DirectRunner, shards, RunInference, shard files,
merge into the NPZ). The model is loaded and compiled once, before either is timed
(reported separately), as is the fixed cost of one pipeline run; each side is then
timed ``--repeats`` times, alternating, and the best of each is kept. The target is ratio >= 0.95 for EfficientNet-Lite0
(224 px) on CPU. ``--dtype auto`` is bfloat16 on a GPU/TPU, float32 on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from auditing.predictions import load_predictions
from models import sample_photos
from models.predictor import default_dtype
from models.registry import get_model
from pipelines.images import ImageFiles
from pipelines.inference import shared_predictor
from pipelines.predict import predict_source


@dataclasses.dataclass
class Timing:
    wall_s: float
    cpu_s: float  # this process's CPU time, all threads: less sensitive to other load
    decode_s: float = 0.0  # bare loop only: read + PIL decode + preprocess
    model_s: float = 0.0  # bare loop only: np.stack + predictor.predict


def write_photo_folder(folder: Path, count: int) -> ImageFiles:
    """``count`` JPEG files cycling through the sample photos (RGB, as a crawl would hold them)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for name, image in sample_photos.load_photos().items():
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    names = list(encoded)
    for i in range(count):
        name = names[i % len(names)]
        (folder / f"img_{i:05d}_{name}.jpg").write_bytes(encoded[name])
    return ImageFiles.from_folder(folder)


def bare_loop(spec, predictor, paths: tuple[str, ...], batch_size: int) -> tuple[Timing, np.ndarray]:
    decode_s = model_s = 0.0
    logits = []
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(paths), batch_size):
        t0 = time.perf_counter()
        images = []
        for path in paths[first:first + batch_size]:
            with Image.open(path) as image:
                images.append(spec.preprocess(image))
        t1 = time.perf_counter()
        logits.append(predictor.predict(np.stack(images))[0])
        t2 = time.perf_counter()
        decode_s += t1 - t0
        model_s += t2 - t1
    timing = Timing(time.perf_counter() - wall, time.process_time() - cpu, decode_s, model_s)
    return timing, np.concatenate(logits)


def beam_run(spec, source: ImageFiles, batch_size: int, dtype: str, out: Path) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    predict_source(spec, source, out, batch_size=batch_size, dtype=dtype)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def benchmark_model(name: str, source: ImageFiles, one_batch: ImageFiles, batch_size: int, dtype: str,
                    repeats: int, work_dir: Path) -> dict[str, float]:
    spec = get_model(name)
    t0 = time.perf_counter()
    predictor = shared_predictor(spec, batch_size, dtype)  # the same object RunInference loads
    load_s = time.perf_counter() - t0
    warmup = np.zeros(spec.input_shape(batch_size), np.float32)
    t0 = time.perf_counter()
    predictor.predict(warmup)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor.predict(warmup)
    compile_s = first_s - (time.perf_counter() - t0)

    # Fixed cost of a pipeline run (options, graph, runner, bundle, merge): one batch each way.
    fixed = [beam_run(spec, one_batch, batch_size, dtype, work_dir / f"{name}-one-{i}.npz").wall_s
             - bare_loop(spec, predictor, one_batch.paths, batch_size)[0].wall_s for i in range(3)]

    bare_runs, beam_runs = [], []
    for repeat in range(repeats):  # alternating, so slow spells of other load hit both sides
        timing, bare_logits = bare_loop(spec, predictor, source.paths, batch_size)
        bare_runs.append(timing)
        out = work_dir / f"{name}-{repeat}.npz"
        beam_runs.append(beam_run(spec, source, batch_size, dtype, out))
        beam_logits = load_predictions(out).logits  # sorted by file name, as source.paths
        np.testing.assert_allclose(beam_logits, bare_logits, rtol=1e-4, atol=1e-4)
    assert predictor.trace_count == 1, f"{name}: compiled {predictor.trace_count} times"
    print(f"  {name} wall s: bare {[round(t.wall_s, 2) for t in bare_runs]}, "
          f"beam {[round(t.wall_s, 2) for t in beam_runs]}")
    bare = min(bare_runs, key=lambda t: t.wall_s)
    n = len(source)
    return {"load_s": load_s, "compile_s": compile_s, "fixed_s": min(fixed),
            "bare_ips": n / bare.wall_s, "beam_ips": n / min(t.wall_s for t in beam_runs),
            "cpu_ratio": min(t.cpu_s for t in bare_runs) / min(t.cpu_s for t in beam_runs),
            "model_ips": n / bare.model_s, "decode_share": bare.decode_s / (bare.decode_s + bare.model_s)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "efficientnet-lite1",
                                                        "efficientnet-lite2"])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    print(f"devices: {jax.devices()}; dtype {dtype}; batch {args.batch_size}; {args.images} images")
    with tempfile.TemporaryDirectory() as tmp:
        source = write_photo_folder(Path(tmp) / "images", args.images)
        one_batch = write_photo_folder(Path(tmp) / "one_batch", args.batch_size)
        print(f"{'model':18s} {'px':>3s} {'load s':>6s} {'compile s':>9s} {'bare img/s':>10s} "
              f"{'beam img/s':>10s} {'ratio':>5s} {'cpu ratio':>9s} {'fixed s':>7s} "
              f"{'model-only img/s':>16s} {'decode share':>12s}")
        for name in args.models:
            r = benchmark_model(name, source, one_batch, args.batch_size, dtype, args.repeats, Path(tmp))
            print(f"{name:18s} {get_model(name).crop_size:3d} {r['load_s']:6.2f} {r['compile_s']:9.2f} "
                  f"{r['bare_ips']:10.1f} {r['beam_ips']:10.1f} {r['beam_ips'] / r['bare_ips']:5.3f} "
                  f"{r['cpu_ratio']:9.3f} {r['fixed_s']:7.2f} {r['model_ips']:16.1f} "
                  f"{r['decode_share']:12.1%}", flush=True)
    print("ratio = Beam pipeline images/s / bare jitted loop images/s, best run of each (target >= 0.95\n"
          "for lite0 on CPU); cpu ratio = the same from process CPU time (steadier on a shared machine);\n"
          "fixed s = a pipeline run's fixed cost (Beam run - bare loop, one batch), not per image.")


if __name__ == "__main__":
    main()
