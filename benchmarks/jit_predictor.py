"""Compile time and throughput of JitPredictor (lite0, batch 32) on this machine, vs torch reference."""
import time, os
import numpy as np
from models import registry, sample_photos
from models.predictor import JitPredictor

spec = registry.get_model("efficientnet-lite0")
photos = list(sample_photos.load_photos().values())
t = time.perf_counter(); one = [spec.preprocess(p) for p in photos]; pre = (time.perf_counter() - t) / len(photos)
images = np.stack([one[i % len(one)] for i in range(256)])
t = time.perf_counter(); predictor = JitPredictor(spec, batch_size=32); load = time.perf_counter() - t
t = time.perf_counter(); predictor.predict(images[:32]); first = time.perf_counter() - t
t = time.perf_counter(); predictor.predict(images[:32]); steady = time.perf_counter() - t
runs = []
for _ in range(3):
    t = time.perf_counter(); predictor.predict(images); runs.append(time.perf_counter() - t)
ips = len(images) / min(runs)
print(f"load+convert {load:.2f}s; first batch (compile+run) {first:.2f}s, steady batch {steady:.2f}s -> compile ~{first-steady:.2f}s")
print(f"JitPredictor lite0 b32 f32: {ips:.1f} images/s (best of 3 x 256 images); traces={predictor.trace_count}")
print(f"preprocess: {1/pre:.0f} images/s (PIL, one core)")
import torch
from efficientnet_lite_pytorch import EfficientNet
m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(spec.source_path())).eval()
x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
with torch.no_grad():
    m(x[:32]); tr = []
    for _ in range(3):
        t = time.perf_counter(); [m(x[i:i+32]) for i in range(0, 256, 32)]; tr.append(time.perf_counter() - t)
print(f"torch reference b32: {256/min(tr):.1f} images/s; ratio jax/torch = {ips/(256/min(tr)):.2f}")
