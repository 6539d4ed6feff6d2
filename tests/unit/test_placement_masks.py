"""Placement.owners and Placement.mask, which route every id of a write and every slot of a step:
the one-shard shortcut answers what the general rule answers, for any ids, and a move is routed
by its cursor."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from monim.workers.placement import Move, Placement

IDS = st.lists(st.integers(min_value=-3, max_value=10_000), min_size=0, max_size=50)


def general_mask(ids, owners, shard):
    return np.where((ids >= 0) & (owners == shard), ids, -1)


@given(IDS, st.integers(min_value=1, max_value=5))
def test_masks_and_owners_follow_id_modulo_shards(ids, shards):
    ids = np.array(ids, np.int64)
    placement = Placement(version=1, num_shards=shards)
    owners = placement.owners("ns", ids)
    np.testing.assert_array_equal(owners[ids >= 0], ids[ids >= 0] % shards)
    for shard in range(shards + 1):  # shard == shards holds nothing
        np.testing.assert_array_equal(placement.mask("ns", ids, shard), general_mask(ids, ids % shards, shard))


def test_during_a_move_ids_below_the_cursor_are_at_their_new_shard():
    move = Move(source=1, target=2, namespaces=["ns"], index=0, cursor=10, mark=100, frozen_end=10)
    placement = Placement(version=2, num_shards=1, move=move)
    ids = np.array([3, 5, 50, 51, 101])
    np.testing.assert_array_equal(placement.owners("ns", ids), [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(placement.mask("ns", ids, 0), [-1, -1, 50, 51, -1])
