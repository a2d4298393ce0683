"""Transform sensitivity: T transforms x M models in one jitted call per batch, against the bound.

    python -m benchmarks.sensitivity [--models efficientnet-lite0 ...] [--images 32]
        [--transforms hflip vflip rotate180 equalize] [--batch-size 16] [--repeats 2]

Images: the first ``--images`` real ImageNet validation JPEGs of
``../shared/data/imagenet_val_sample`` (else the real sample photos of
``models.sample_photos``). Measured in one process, after every model is loaded and
compiled (reported apart):

- audit: read + decode + crop each image once (per model resolution), then
  ``TransformedPredictor.predict`` (every model under every transform);
- plain: T x M runs of the plain stage-1 path (read + decode + ``spec.preprocess`` +
  ``JitPredictor.predict``), the transform applied on the host crop in between;
- bound: (T x M) x the bare jitted model time (``JitPredictor.predict`` on ready
  arrays, no decode) + one decode.

Prints ``ratio = bound / audit`` (target >= 0.9: the audit costs no more than the
models themselves plus one decode), the speed-up against the plain runs and the
decode share of the audit. Wall and process CPU time are both given; on a loaded
machine CPU time is the steadier one. Each side runs ``--repeats`` times, alternating;
the best is kept.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from models import preprocessing
from models.predictor import JitPredictor
from models.registry import get_model
from models.transformed_predictor import TransformedPredictor, crops_for, resolution_of
from models.transforms import image_ids, parse_transforms

TRANSFORM_ENTRIES = {"hflip": "hflip", "vflip": "vflip", "rotate180": {"rotate": 180},
                     "rotate30": {"rotate": 30}, "equalize": "equalize", "brightness": {"brightness": 1.5},
                     "zoom": {"zoom": 1.25}, "translate": {"translate": {"x": 0.1, "y": 0.1}},
                     "perspective": {"perspective": 0.3}}


def image_paths(count: int) -> list[Path]:
    from auditing import sources

    root = sources.shared_data_dir()
    if root is not None and (root / "imagenet_val_sample" / "images").is_dir():
        paths = sorted((root / "imagenet_val_sample" / "images").glob("*.JPEG"))[:count]
        print(f"images: {len(paths)} real ImageNet validation JPEGs from {root / 'imagenet_val_sample'}")
        return paths
    import tempfile

    from models import sample_photos

    folder = Path(tempfile.mkdtemp(prefix="sensitivity-bench-"))
    photos = list(sample_photos.load_photos().items())
    paths = []
    for i in range(count):
        name, photo = photos[i % len(photos)]
        paths.append(folder / f"{i:04d}_{name}.jpg")
        photo.convert("RGB").save(paths[-1], quality=90)
    print(f"images: {count} JPEGs cycling through the {len(photos)} real sample photos")
    return paths


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0"])
    parser.add_argument("--transforms", nargs="+", default=["hflip", "vflip", "rotate180", "equalize"],
                        choices=sorted(TRANSFORM_ENTRIES))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    specs = [get_model(m) for m in args.models]
    transforms = parse_transforms([TRANSFORM_ENTRIES[t] for t in args.transforms])
    paths = image_paths(args.images)
    names = [p.name for p in paths]
    ids = image_ids(names)
    T, M = len(transforms), len(specs)
    print(f"{T} transforms (with the identity) x {M} models, batch {args.batch_size}, {jax.default_backend()}")

    audit_predictor, load_s, _ = timed(lambda: TransformedPredictor(specs, transforms, batch_size=args.batch_size))
    plain = {s.name: JitPredictor(s, batch_size=args.batch_size) for s in specs}
    resolutions = audit_predictor.resolutions

    def decode_once():
        crops = [crops_for(Image.open(p), resolutions) for p in paths]
        return {r: np.stack([c[r] for c in crops]) for r in resolutions}

    def audit():
        return audit_predictor.predict(decode_once(), ids)

    normalised = {s.name: np.stack([s.preprocess(Image.open(p)) for p in paths]) for s in specs}

    def bare():
        for s in specs:
            plain[s.name].predict(normalised[s.name])

    def plain_runs():
        for transform in transforms:
            for s in specs:  # one stage-1 run per (model, transform): decode, transform, predict
                crops = np.stack([crops_for(Image.open(p), [resolution_of(s)])[resolution_of(s)] for p in paths])
                moved = np.asarray(transform_fns[transform.name](jnp.asarray(crops, jnp.float32), jnp.asarray(ids)))
                plain[s.name].predict(preprocessing.normalize(moved, s.mean, s.std))

    transform_fns = {t.name: jax.jit(t.apply_batch) for t in transforms}
    _, compile_s, _ = timed(audit)  # compiles the audit, then the plain side
    timed(bare)
    timed(plain_runs)
    runs = {"audit": [], "bare": [], "plain": [], "decode": []}
    for _ in range(args.repeats):  # alternating, so slow spells of other load hit every side
        for name, fn in (("audit", audit), ("bare", bare), ("plain", plain_runs), ("decode", decode_once)):
            _, wall, cpu = timed(fn)
            runs[name].append((wall, cpu))
    best = {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}
    assert audit_predictor.trace_count == 1, f"the audit compiled {audit_predictor.trace_count} times"

    # Sanity: the identity logits are the plain predictor's.
    logits = audit()
    for m, s in enumerate(specs):
        np.testing.assert_allclose(logits[m, 0], plain[s.name].predict(normalised[s.name])[0], rtol=1e-4, atol=1e-4)

    print(f"load {load_s:.1f} s, first audit call (compile) {compile_s:.1f} s")
    for i, clock in enumerate(("wall", "cpu")):
        audit_s, bare_s, plain_s, decode_s = (best[k][i] for k in ("audit", "bare", "plain", "decode"))
        bound = T * bare_s + decode_s
        print(f"{clock:4s}: audit {audit_s:.2f} s, bare models {bare_s:.2f} s x {T} transforms, decode {decode_s:.2f} s"
              f" -> bound {bound:.2f} s; ratio bound/audit {bound / audit_s:.3f} (target >= 0.9); "
              f"{T} x {M} plain runs {plain_s:.2f} s ({plain_s / audit_s:.2f}x the audit); "
              f"decode share {decode_s / audit_s:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
