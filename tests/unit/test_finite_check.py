"""validation.all_finite, the one-pass check every batch of keys, queries and values goes through:
exact whatever the values (a sum that overflows on finite values is told apart from Inf and NaN)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monim.protos.errors import InvalidArgument
from monim.protos.validation import all_finite, check_vectors


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_all_finite_agrees_with_isfinite(array):
    assert all_finite(array) == bool(np.isfinite(array).all())


def test_finite_values_whose_sum_overflows_pass_and_inf_or_nan_among_them_does_not():
    huge = np.full((4, 8), 3e38, np.float32)
    assert all_finite(huge) and check_vectors(huge, 8, "keys") is not None
    for bad in (np.inf, -np.inf, np.nan):
        array = huge.copy()
        array[2, 5] = bad
        assert not all_finite(array)
        with pytest.raises(InvalidArgument, match=r"keys contain NaN or Inf \(first at row 2\)"):
            check_vectors(array, 8, "keys")
