"""Arrow column builders shared by the world's stages (vectorised; no per-row Python)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def ids(prefix: str, codes: np.ndarray, width: int) -> pa.Array:
    """`prefix` + zero-padded code, e.g. ids("p", [3], 7) -> ["p0000003"] (sorts like the codes)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.asarray(codes, dtype=np.int64)), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def id_width(n: int, minimum: int = 6) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def take(values: Sequence[str] | pa.Array, codes: np.ndarray) -> pa.Array:
    """values[codes] as an Arrow string array."""
    array = values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())
    return array.take(pa.array(np.asarray(codes, dtype=np.int64)))


def string_map(keys: Sequence[pa.Array], names: Sequence[str]) -> pa.MapArray:
    """One map per row from equal-length string columns: row i -> {names[j]: keys[j][i]}."""
    n_rows, n_keys = len(keys[0]), len(names)
    interleave = (np.arange(n_keys)[None, :] * n_rows + np.arange(n_rows)[:, None]).ravel()
    items = pa.concat_arrays([k.cast(pa.string()) for k in keys]).take(pa.array(interleave))
    map_keys = pa.array(list(names), pa.string()).take(pa.array(np.tile(np.arange(n_keys), n_rows)))
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * n_keys)
    return pa.MapArray.from_arrays(offsets, map_keys, items)


def sparse_map(codes: np.ndarray, key_names: Sequence[str], value_names: Sequence[Sequence[str]]) -> pa.MapArray:
    """Row maps from an (n_rows, n_keys) code matrix, -1 = absent: key j -> value_names[j][code]."""
    rows, cols = np.nonzero(codes >= 0)  # row-major: grouped by row, keys in column order
    offsets_of_key = np.concatenate([[0], np.cumsum([len(v) for v in value_names])])
    flat_values = pa.array([v for values in value_names for v in values], pa.string())
    values = flat_values.take(pa.array(offsets_of_key[cols] + codes[rows, cols].astype(np.int64)))
    keys = pa.array(list(key_names), pa.string()).take(pa.array(cols.astype(np.int64)))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=codes.shape[0]))]).astype(np.int32)
    return pa.MapArray.from_arrays(pa.array(offsets), keys, values)
