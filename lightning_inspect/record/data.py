"""A fingerprint of the training data: sizes and a content hash of items spread over each dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import torch

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _feed(h: Any, value: Any, depth: int = 0) -> None:
    """Type-tagged and length-prefixed, so that different values never feed the same bytes."""
    items: list[Any] = []
    payload: Any = b""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        t = (t.to_dense() if t.layout != torch.strided else t).cpu().resolve_conj().resolve_neg()
        tag = f"tensor:{t.dtype}:{tuple(t.shape)}"
        payload = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    elif isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype != object:
        array = np.ascontiguousarray(value)
        tag, payload = f"ndarray:{array.dtype.str}:{array.shape}", array.tobytes()
    elif isinstance(value, (str, bytes, bytearray)):
        tag = type(value).__name__
        payload = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        tag, payload = f"image:{value.mode}:{getattr(value, 'size', None)}", value.tobytes()
    elif depth < 50 and isinstance(value, (Mapping, list, tuple, set, frozenset, np.ndarray)):
        if isinstance(value, Mapping):
            items = [x for key in sorted(value, key=repr) for x in (key, value[key])]
        else:
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        tag = f"{type(value).__name__}:{len(items)}:{getattr(value, 'shape', '')}"
    elif depth < 50 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [x for f in dataclasses.fields(value) for x in (f.name, getattr(value, f.name))]
        tag = f"dataclass:{type(value).__qualname__}"
    else:  # numbers, None, other objects: their text, without memory addresses
        tag = f"{type(value).__module__}.{type(value).__qualname__}"
        payload = _ADDRESS.sub("", repr(value)).encode()
    head, payload = tag.encode(), bytes(payload)
    h.update(len(head).to_bytes(4, "little") + head + len(payload).to_bytes(8, "little") + payload)
    for item in items:
        _feed(h, item, depth + 1)


def content_hash(value: Any) -> str:
    """A SHA-256 of ``value``'s content, the same whatever the memory layout, device or machine."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


@contextmanager
def fixed_random_state(seed: int = 0) -> Iterator[None]:
    """Python, NumPy and PyTorch (CPU) seeded with ``seed`` inside; their states restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _size(obj: Any) -> int | None:
    with suppress(Exception):
        return len(obj)
    return None


def fingerprint_dataset(dataset: Any, items: int = 32) -> dict[str, Any]:
    """Size and content hash of ``items`` items spread evenly over ``dataset`` (0: size only).

    Items are read with every generator seeded to 0; ``deterministic``: the first item, read
    twice, is the same.
    """
    size, kind = _size(dataset), type(dataset)
    out = {"dataset": f"{kind.__module__}.{kind.__qualname__}", "size": size, "items_hashed": 0}
    out.update(hash=None, deterministic=None)
    iterable = size is None or isinstance(dataset, torch.utils.data.IterableDataset)
    if items <= 0:
        return out
    if iterable and iter(dataset) is dataset:
        return {**out, "note": "a one-shot iterator: not read (reading it would consume it)"}

    def read(indices: Any) -> Any:
        with fixed_random_state(0):
            if iterable:
                return list(itertools.islice(dataset, items))
            return [(i, dataset[i]) for i in indices]

    try:
        count = 0 if iterable else min(items, size)
        step = (size - 1) / max(count - 1, 1) if count else 0
        sample = read(sorted({round(i * step) for i in range(count)}))
        out.update(items_hashed=len(sample), hash=content_hash(sample))
        if not iterable and size:
            # item 0 leads the sample, read under the same random state: read it once more
            out["deterministic"] = content_hash(sample[:1]) == content_hash(read([0]))
    except Exception as exc:  # a dataset that cannot be read here: say why
        out["hash"], out["note"] = None, f"items could not be read ({type(exc).__name__}: {exc})"
    return out


def _named_loaders(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    if hasattr(obj, "iterables") and not isinstance(obj, torch.utils.data.DataLoader):
        return _named_loaders(obj.iterables, prefix)  # a CombinedLoader
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        return _named_loaders(obj[0], prefix)
    if isinstance(obj, (Mapping, list, tuple)):
        pairs = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
        return [pair for k, v in pairs for pair in _named_loaders(v, f"{prefix}/{k}")]
    return [] if obj is None else [(prefix, obj)]


def fingerprint_loaders(loaders: Mapping[str, Any], items: int = 32) -> dict[str, dict[str, Any]]:
    """One fingerprint per loader (``{"train": {...}, "val/0": {...}}``) and an ``"all"`` hash;
    ``loaders``: stage -> what the Trainer holds (loaders, lists or dicts of them).
    """
    out: dict[str, dict[str, Any]] = {}
    for stage, obj in loaders.items():
        for name, loader in _named_loaders(obj, stage):
            dataset = getattr(loader, "dataset", None)
            batch_size = getattr(loader, "batch_size", None)
            if batch_size is None:
                batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
            entry = fingerprint_dataset(loader if dataset is None else dataset, items)
            out[name] = {"batches": _size(loader), "batch_size": batch_size, **entry}
    if out:
        hashes = "\n".join(f"{k}:{v.get('hash')}:{v.get('size')}" for k, v in sorted(out.items()))
        out["all"] = {"hash": hashlib.sha256(hashes.encode()).hexdigest()}
    return out
