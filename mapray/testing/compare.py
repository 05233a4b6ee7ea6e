"""What "the same values as a clean run" means for mapray's scores, for the tests that rerun, resume, rescore or
lose a node: the torch engines' fp32 sums change in the last bits with the rows that share a batch (seen: 1.2e-7
on a reward, 9.5e-7 relative on a log-prob sum of -1300), and a resumed, cached or disturbed run batches some rows
differently. So float columns agree to fp32 rounding; everything else (ids, texts, token counts, truncation flags,
`selected`) exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FP32_RTOL, FP32_ATOL = 1e-6, 1e-5


def assert_same_rows(got: pa.Table, want: pa.Table, floats_at_least: set[str]) -> None:
    """Two runs' rows (sorted alike): the same schema and row count (> 0), float columns to fp32 rounding, every
    other column exactly. `floats_at_least`: float columns that must be among them, so the check has teeth."""
    assert got.schema == want.schema, [(a, b) for a, b in zip(got.schema, want.schema) if a != b]
    assert got.num_rows == want.num_rows > 0
    floats = [f.name for f in want.schema if pa.types.is_floating(f.type)]
    assert floats_at_least <= set(floats), floats_at_least - set(floats)
    for name in want.column_names:
        if name in floats:
            a, b = (t[name].to_numpy(zero_copy_only=False).astype(float) for t in (got, want))
            np.testing.assert_allclose(a, b, rtol=FP32_RTOL, atol=FP32_ATOL, err_msg=name)
        else:
            assert got[name].to_pylist() == want[name].to_pylist(), name
