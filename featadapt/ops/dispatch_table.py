"""The dispatch table: where a committed measurement says a fused backend is
correct and faster than `torch` (DESIGN.md §2).

Automatic dispatch picks a fused backend (`triton`, `cuda`) only for a case
the table lists; every other case runs on `torch` (cuBLAS or oneDNN under
torch ops, known to be right). The table ships inside the package
(dispatch_table.json beside this file), written by the GPU check from what it
measured (tools/write_dispatch_table.py); FEATADAPT_DISPATCH_TABLE=PATH reads
another file instead, e.g. one a user wrote on their own GPU.

An entry:

    {"device": "sm_90", "op": "vefa", "dtype": "bfloat16",
     "tokens": [4096, 16384], "rank": null,
     "backend": "triton", "ratio": 0.93,
     "measured": {"device_name": "NVIDIA H200", "date": "...", "torch": "...", ...}}

`device` is the device class ("sm_90" for compute capability 9.0, "cpu");
`op` one of dispatch.OPS or INDEXED_OPS; `dtype` the activation dtype;
`tokens` and `rank` inclusive [low, high] ranges of tokens per call (M) and
adapter rank (null: any, and a null bound is open); `ratio` the measured
forward+backward time of `backend` over `torch`'s (below 1: faster).
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

TABLE_ENV = "FEATADAPT_DISPATCH_TABLE"
SHIPPED_TABLE = os.path.join(os.path.dirname(__file__), "dispatch_table.json")
FORMAT = 1
LOW_RANK_OPS = ("lora", "lorfa", "lora_indexed", "lorfa_indexed")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


class DispatchTableError(ValueError):
    """The dispatch table file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Entry:
    device: str
    op: str
    dtype: str
    tokens: Optional[Tuple[Optional[int], Optional[int]]]
    rank: Optional[Tuple[Optional[int], Optional[int]]]
    backend: str
    ratio: float
    measured: dict

    def covers(self, device, op, dtype, tokens, rank):
        return (self.device == device and self.op == op and self.dtype == dtype
                and _within(self.tokens, tokens) and _within(self.rank, rank))

    def describe(self):
        where = self.measured.get("device_name", "an unnamed device")
        date = self.measured.get("date", "an unrecorded date")
        return f"{self.backend} measured {self.ratio:.2f}x torch's time on {where}, {date}"


def _within(bounds, value):
    if bounds is None or value is None:
        return True
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def device_class(device):
    """"sm_90" for a CUDA device of compute capability 9.0, else the device type ("cpu")."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


def case_of(op, tensors):
    """(device class, op, dtype name, tokens, rank) of a call: tensors as dispatch
    receives them, (x, weight, bias, *params), x not yet flattened."""
    x = tensors[0]
    tokens = math.prod(x.shape[:-1])
    rank = tensors[3].shape[-2] if op in LOW_RANK_OPS else None
    return device_class(x.device), op, str(x.dtype).removeprefix("torch."), tokens, rank


def _range(value, name, where):
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value)):
        raise DispatchTableError(f"{where}: {name} must be null or [low, high] of non-negative integers "
                                 f"or nulls, got {value!r}")
    return tuple(value)


def parse_table(data, source):
    """The entries of a table's JSON data; DispatchTableError naming `source` and the entry if malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise DispatchTableError(f"{source}: expected an object with \"format\": {FORMAT} and a list "
                                 f"\"entries\", got {str(data)[:200]!r}")
    from .dispatch import INDEXED_OPS, OPS  # (dispatch imports this module)

    entries = []
    for i, raw in enumerate(data["entries"]):
        where = f"{source}, entry {i}"
        if not isinstance(raw, dict):
            raise DispatchTableError(f"{where}: expected an object, got {raw!r}")
        missing = {"device", "op", "dtype", "backend", "ratio"} - set(raw)
        if missing:
            raise DispatchTableError(f"{where}: missing {sorted(missing)}")
        if raw["op"] not in OPS + INDEXED_OPS:
            raise DispatchTableError(f"{where}: op must be one of {OPS + INDEXED_OPS}, got {raw['op']!r}")
        if raw["dtype"] not in _DTYPES:
            raise DispatchTableError(f"{where}: dtype must be one of {_DTYPES}, got {raw['dtype']!r}")
        ratio = raw["ratio"]
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
            raise DispatchTableError(f"{where}: ratio must be a positive number, got {ratio!r}")
        if not isinstance(raw["backend"], str) or not isinstance(raw["device"], str):
            raise DispatchTableError(f"{where}: backend and device must be strings, got "
                                     f"{raw['backend']!r} and {raw['device']!r}")
        entries.append(Entry(raw["device"], raw["op"], raw["dtype"], _range(raw.get("tokens"), "tokens", where),
                             _range(raw.get("rank"), "rank", where), raw["backend"], float(ratio),
                             dict(raw.get("measured") or {})))
    return tuple(entries)


_loaded = {}  # path -> entries, read once per path


def table_path():
    return os.environ.get(TABLE_ENV) or SHIPPED_TABLE


def read_table(path):
    """The entries of the table file at `path` (DispatchTableError when it is malformed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        if path == SHIPPED_TABLE:
            return ()  # an install without the data file: nothing measured
        raise DispatchTableError(f"{TABLE_ENV}={path!r} cannot be read: {error}") from None
    except ValueError as error:
        raise DispatchTableError(f"dispatch table {path!r} is not valid JSON: {error}") from None
    return parse_table(data, repr(path))


def entries():
    """The entries of the table in force, read once per path (reload() reads again)."""
    # No lock: torch.compile traces this on every call and cannot trace one;
    # two threads that both read the file store the same entries.
    path = table_path()
    cached = _loaded.get(path)
    if cached is None:
        cached = _loaded[path] = read_table(path)
    return cached


def reload():
    """Forget the tables read so far: the next call reads the file again."""
    _loaded.clear()


def lookup(op, tensors):
    """(entry, case) for a call: the first table entry covering it, or None; with
    an empty table (None, None), without looking at the call (every op call asks)."""
    table = entries()
    if not table:
        return None, None
    case = case_of(op, tensors)
    for entry in table:
        if entry.covers(*case):
            return entry, case
    return None, case


def describe_case(case):
    device, op, dtype, tokens, rank = case
    rank_text = "" if rank is None else f", rank {rank}"
    return f"{op} {dtype} on {device} at {tokens} tokens{rank_text}"
