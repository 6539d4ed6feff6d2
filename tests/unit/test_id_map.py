"""IdMap: the id -> row lookup of a RowStore, checked against a plain dict."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monim.datastore.id_map import ABSENT, IdMap

INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


def lookup_in(model: dict[int, int], ids: np.ndarray) -> np.ndarray:
    return np.array([model.get(int(i), ABSENT) for i in ids.reshape(-1)], np.int64).reshape(ids.shape)


def test_memory_follows_live_ids_not_ids_ever_issued():
    # A shard of a 3-shard store: ids 1, 4, 7, ... issued by a counter that never goes back.
    # Blocks are appended, the oldest rows evicted (holes filled from the tail, as RowStore
    # does), and a few rows of the first block survive forever.
    stride, offset, block, live_target = 3, 1, 100, 1_000
    id_map, model = IdMap(stride, offset), {}
    row_ids: list[int] = []  # row r holds id row_ids[r]
    survivors = {offset + stride * k for k in (0, 17, 42, 63, 99)}
    next_slot = 0
    for step in range(10_500):
        new_ids = offset + stride * np.arange(next_slot, next_slot + block, dtype=np.int64)
        next_slot += block
        new_rows = np.arange(len(row_ids), len(row_ids) + block, dtype=np.int64)
        id_map.assign(new_ids, new_rows)
        row_ids.extend(new_ids.tolist())
        model.update(zip(new_ids.tolist(), new_rows.tolist()))
        if len(row_ids) > live_target:
            oldest = sorted(i for i in model if i not in survivors)[:block]
            gone_rows = np.sort([model.pop(i) for i in oldest])
            id_map.assign(np.array(oldest, np.int64), np.full(len(oldest), ABSENT, np.int64))
            new_size = len(row_ids) - len(gone_rows)
            holes = gone_rows[gone_rows < new_size]
            gone = set(gone_rows.tolist())
            movers = [r for r in range(new_size, len(row_ids)) if r not in gone]
            moved_ids = np.array([row_ids[r] for r in movers], np.int64)
            for hole, moved in zip(holes.tolist(), moved_ids.tolist()):
                row_ids[hole] = moved
                model[moved] = hole
            del row_ids[new_size:]
            id_map.assign(moved_ids, holes.astype(np.int64))
        assert id_map.nbytes < 64 * 1024, f"step {step}: {id_map.nbytes} bytes for {len(model)} live ids"
        if step % 500 == 0 or step == 10_499:
            probe = np.array([*model, *range(-5, 5 * stride * block), next_slot * stride + offset, INT64_MIN], np.int64)
            np.testing.assert_array_equal(id_map.lookup(probe), lookup_in(model, probe))
    assert next_slot >= 1_000_000
    assert len(id_map) == len(model)
    assert survivors <= set(model)


def test_lookup_keeps_the_shape_of_the_ids():
    id_map = IdMap(stride=2, offset=1)
    id_map.assign(np.array([1, 3, 5, 8, -7]), np.array([10, 11, 12, 13, 14]))
    ids = np.array([[1, 3, 2], [8, -7, -1], [5, 7, INT64_MIN]])
    rows = id_map.lookup(ids)
    assert rows.dtype == np.int64 and rows.shape == (3, 3)
    np.testing.assert_array_equal(rows, [[10, 11, ABSENT], [13, 14, ABSENT], [12, ABSENT, ABSENT]])
    assert id_map.lookup(np.empty((0, 4), np.int64)).shape == (0, 4)
    assert len(id_map) == 5


def test_ids_off_the_pattern_alone():
    id_map = IdMap(stride=4, offset=2)
    id_map.assign(np.array([3, -8, INT64_MIN]), np.array([0, 1, 2]))
    id_map.assign(np.array([-8]), np.array([ABSENT]))
    np.testing.assert_array_equal(id_map.lookup(np.array([3, -8, INT64_MIN, 2])), [0, ABSENT, 2, ABSENT])
    assert len(id_map) == 2


def test_ids_far_apart_do_not_allocate_the_gap():
    id_map = IdMap()
    ids = np.array([0, 5, 10**12, 10**15, 2**62, INT64_MAX], np.int64)
    id_map.assign(ids, np.arange(6, dtype=np.int64))
    assert id_map.nbytes < 64 * 1024
    np.testing.assert_array_equal(id_map.lookup(ids), np.arange(6))
    np.testing.assert_array_equal(id_map.lookup(ids + 1)[:-1], ABSENT)


@pytest.mark.parametrize("stride, offset", [(1, 0), (3, 1)])
def test_ids_at_the_ends_of_int64(stride, offset):
    id_map = IdMap(stride, offset)
    top = offset + stride * ((INT64_MAX - offset) // stride - np.arange(10, dtype=np.int64))
    id_map.assign(top, np.arange(10, dtype=np.int64))  # the window moves up to the top of int64
    np.testing.assert_array_equal(id_map.lookup(top), np.arange(10))
    negative = np.concatenate([INT64_MIN + np.arange(5_000, dtype=np.int64), -np.arange(1, 5_000, dtype=np.int64)])
    np.testing.assert_array_equal(id_map.lookup(negative), ABSENT)
    id_map.assign(negative[:3], np.array([20, 21, 22]))
    np.testing.assert_array_equal(id_map.lookup(negative[:4]), [20, 21, 22, ABSENT])
    for probe in (top, negative, negative[:4]):
        np.testing.assert_array_equal(id_map.lookup_tensor(torch.from_numpy(probe)).numpy(), id_map.lookup(probe))


def test_bad_pattern_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        IdMap(stride=0)
    with pytest.raises(ValueError, match="offset"):
        IdMap(stride=2, offset=-1)


@st.composite
def id_patterns(draw):
    stride = draw(st.integers(1, 4))
    return stride, draw(st.integers(0, stride - 1)), draw(st.sampled_from([1, 4, 1024]))


def some_ids(draw, stride, offset, next_slot):
    """A few distinct ids: the store's pattern near the counter, old and far slots, and ids of any kind."""
    regular = st.one_of(
        st.integers(max(0, next_slot - 40), next_slot + 5),
        st.integers(0, 30),
        st.integers(10**9, 10**9 + 10),
        st.integers((INT64_MAX - offset) // stride - 10, (INT64_MAX - offset) // stride),
    ).map(lambda slot: offset + stride * slot)
    anything = st.one_of(
        st.integers(-50, 50), st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX)
    )
    return draw(st.lists(st.one_of(regular, regular, anything), max_size=12, unique=True))


@settings(max_examples=300, deadline=None)
@given(st.data(), id_patterns())
def test_matches_a_dict_under_random_changes(data, pattern):
    stride, offset, min_table_slots = pattern
    id_map, model = IdMap(stride, offset, min_table_slots=min_table_slots), {}
    next_slot, next_row = 0, 0
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(["append", "assign", "evict", "remove", "move", "lookup"]))
        if action == "append":  # the common case: a block of the next ids of the counter
            count = data.draw(st.integers(1, 30))
            ids = offset + stride * np.arange(next_slot, next_slot + count, dtype=np.int64)
            next_slot += count
            rows = np.arange(next_row, next_row + count, dtype=np.int64)
        elif action == "assign":
            ids = np.array(some_ids(data.draw, stride, offset, next_slot), np.int64)
            rows = np.arange(next_row, next_row + ids.size, dtype=np.int64)
        elif action == "evict":  # the oldest ids
            ids = np.array(sorted(model)[: data.draw(st.integers(0, 30))], np.int64)
            rows = np.full(ids.size, ABSENT, np.int64)
        elif action == "remove":  # stored or not
            stored = data.draw(st.lists(st.sampled_from(sorted(model)), unique=True)) if model else []
            ids = np.array(list(dict.fromkeys(stored + some_ids(data.draw, stride, offset, next_slot))), np.int64)
            rows = np.full(ids.size, ABSENT, np.int64)
        elif action == "move":  # surviving ids get new rows
            ids = np.array(data.draw(st.lists(st.sampled_from(sorted(model)), unique=True)) if model else [], np.int64)
            rows = np.arange(next_row, next_row + ids.size, dtype=np.int64)
        else:
            probe = np.array(list(model) + some_ids(data.draw, stride, offset, next_slot), np.int64)
            probe = probe.reshape(1, -1, 1) if data.draw(st.booleans()) else probe
            np.testing.assert_array_equal(id_map.lookup(probe), lookup_in(model, probe))
            # The device twin (here on CPU tensors), with its table copy made at the last change.
            np.testing.assert_array_equal(id_map.lookup_tensor(torch.from_numpy(probe)).numpy(), lookup_in(model, probe))
            continue
        next_row += ids.size
        id_map.assign(ids, rows)
        for entry_id, row in zip(ids.tolist(), rows.tolist()):
            if row == ABSENT:
                model.pop(entry_id, None)
            else:
                model[entry_id] = row
        assert len(id_map) == len(model)
    every = np.array(list(model) + [-1, INT64_MIN, offset + stride * next_slot], np.int64)
    np.testing.assert_array_equal(id_map.lookup(every), lookup_in(model, every))
