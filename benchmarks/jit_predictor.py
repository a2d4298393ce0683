"""Compile time and throughput of JitPredictor (EfficientNet-Lite0, batch 32) against the
reference PyTorch implementation on the same images, in the same run.

    python -m benchmarks.jit_predictor

Images: the real sample photos (models/sample_photos.py) repeated to 256.
"""
from __future__ import annotations

import time

import numpy as np

from models import registry, sample_photos
from models.predictor import JitPredictor

N_IMAGES, BATCH = 256, 32


def main() -> int:
    spec = registry.get_model("efficientnet-lite0")
    photos = list(sample_photos.load_photos().values())
    t = time.perf_counter()
    one = [spec.preprocess(p) for p in photos]
    preprocess_s = (time.perf_counter() - t) / len(photos)
    images = np.stack([one[i % len(one)] for i in range(N_IMAGES)])
    t = time.perf_counter()
    predictor = JitPredictor(spec, batch_size=BATCH)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    predictor.predict(images[:BATCH])
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    predictor.predict(images[:BATCH])
    steady_s = time.perf_counter() - t
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        predictor.predict(images)
        runs.append(time.perf_counter() - t)
    jax_ips = N_IMAGES / min(runs)
    print(f"load+convert {load_s:.2f} s; first batch (compile+run) {first_s:.2f} s, steady batch "
          f"{steady_s:.2f} s -> compile ~{first_s - steady_s:.2f} s")
    print(f"JitPredictor lite0 b{BATCH} float32: {jax_ips:.1f} images/s (best of 3 x {N_IMAGES}); "
          f"traces={predictor.trace_count}")
    print(f"preprocess (PIL, one core): {1 / preprocess_s:.0f} images/s")
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        print("torch / efficientnet-lite-pytorch not installed (test extra): no reference ratio")
        return 0
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(spec.source_path())).eval()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    torch_runs = []
    with torch.no_grad():
        model(x[:BATCH])
        for _ in range(3):
            t = time.perf_counter()
            for i in range(0, N_IMAGES, BATCH):
                model(x[i:i + BATCH])
            torch_runs.append(time.perf_counter() - t)
    torch_ips = N_IMAGES / min(torch_runs)
    print(f"torch reference b{BATCH}: {torch_ips:.1f} images/s; ratio jax/torch = {jax_ips / torch_ips:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
