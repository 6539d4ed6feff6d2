import pytest
from monim.datastore import NamespaceConfig, validate_namespace_name
from monim.protos.errors import InvalidArgument


@pytest.mark.parametrize("name, fragment", [
    ("", "empty"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("x" * 129, "129 characters"),
    ("..", "may not be"),
    ("sp ace", "may use only"),
])
def test_bad_namespace_names_are_named_in_the_error(name, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        validate_namespace_name(name)


def test_good_names_pass():
    for name in ("gpt2", "gpt2-medium.day_1", "x" * 128):
        assert validate_namespace_name(name) == name


@pytest.mark.parametrize("options, fragment", [
    (dict(dim=0), "dim must be"),
    (dict(dim=8, metric="cosine"), "unknown metric 'cosine'"),
    (dict(dim=8, index="hnsw2"), "unknown index 'hnsw2'"),
    (dict(dim=8, max_k=0), "max_k must be"),
    (dict(dim=8, max_k=5000), "max_k must be"),
    (dict(dim=8, value_dim=-1), "value_dim must be"),
    (dict(dim=8, key_dtype="int8"), "unknown key_dtype"),
    (dict(dim=8.5), "dim must be an integer"),
])
def test_bad_options_are_rejected(options, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        NamespaceConfig(name="ns", **options)


def test_from_dict_rejects_unknown_options():
    with pytest.raises(InvalidArgument, match="unknown namespace option"):
        NamespaceConfig.from_dict({"name": "ns", "dim": 4, "colour": "red"})


def test_round_trip():
    config = NamespaceConfig(name="ns", dim=16, metric="ip", value_dim=4, max_k=32)
    assert NamespaceConfig.from_dict(config.to_dict()) == config


def test_hnsw_fills_in_its_defaults_and_keeps_them():
    config = NamespaceConfig(name="g", dim=8, index="hnsw")
    assert (config.hnsw_m, config.ef_construction, config.train_min_rows) == (32, 64, 10_000)
    assert (config.nlist, config.pq_m) == (0, 0)
    assert NamespaceConfig.from_dict(config.to_dict()) == config
    given = NamespaceConfig(name="g", dim=8, index="hnsw", hnsw_m=2, ef_construction=4096, train_min_rows=1)
    assert (given.hnsw_m, given.ef_construction, given.train_min_rows) == (2, 4096, 1)
    assert NamespaceConfig(name="g", dim=8, index="hnsw", hnsw_m=512).hnsw_m == 512


def test_the_hnsw_options_stay_0_on_other_indexes():
    for index in ("flat", "ivf_flat", "ivf_pq"):
        config = NamespaceConfig(name="n", dim=8, index=index, **({} if index == "flat" else {"nlist": 4}))
        assert (config.hnsw_m, config.ef_construction) == (0, 0)
    assert NamespaceConfig(name="n", dim=8).train_min_rows == 0
    assert NamespaceConfig(name="n", dim=8, index="ivf_flat", nlist=4).train_min_rows == 256  # ivf's rule as before


def test_a_stored_config_without_the_hnsw_keys_still_loads():
    """Registry and snapshot files written before hnsw: their configs have no hnsw_m / ef_construction."""
    old = {"name": "old", "dim": 16, "metric": "l2", "index": "ivf_pq", "value_dim": 0, "max_k": 1024,
           "key_dtype": "auto", "optimizer": {"name": "sgd", "lr": 0.01}, "generation": 7, "nlist": 8, "pq_m": 8,
           "train_min_rows": 512}
    config = NamespaceConfig.from_dict(old)
    assert (config.hnsw_m, config.ef_construction, config.train_min_rows) == (0, 0, 512)
    flat = NamespaceConfig.from_dict({"name": "f", "dim": 4, "index": "flat", "nlist": 0, "pq_m": 0,
                                      "train_min_rows": 0})
    assert (flat.hnsw_m, flat.ef_construction, flat.train_min_rows) == (0, 0, 0)


@pytest.mark.parametrize("options, message", [
    (dict(hnsw_m=1), "hnsw_m must be in [2, 512], got 1"),
    (dict(hnsw_m=513), "hnsw_m must be in [2, 512], got 513"),
    (dict(hnsw_m=-1), "hnsw_m must be >= 0 (0: the default), got -1"),
    (dict(ef_construction=4097), "ef_construction must be in [1, 4096], got 4097"),
    (dict(ef_construction=-5), "ef_construction must be >= 0 (0: the default), got -5"),
    (dict(train_min_rows=(1 << 40) + 1), f"train_min_rows must be in [1, {1 << 40}] for hnsw, got {(1 << 40) + 1}"),
    (dict(train_min_rows=-1), "train_min_rows must be >= 0"),
    (dict(hnsw_m=True), "hnsw_m must be an integer, got True"),
    (dict(ef_construction=8.0), "ef_construction must be an integer, got 8.0"),
    (dict(nlist=8), "nlist applies to index ivf_flat or ivf_pq, not 'hnsw'; leave it 0"),
    (dict(pq_m=4), "pq_m applies to index ivf_pq, not 'hnsw'; leave it 0"),
])
def test_bad_hnsw_options_are_refused(options, message):
    with pytest.raises(InvalidArgument) as refused:
        NamespaceConfig(name="g", dim=8, index="hnsw", **options)
    assert message in refused.value.message


@pytest.mark.parametrize("index, options, message", [
    ("flat", dict(hnsw_m=16), "hnsw_m applies to index hnsw, not 'flat'; leave it 0"),
    ("flat", dict(ef_construction=40), "ef_construction applies to index hnsw, not 'flat'; leave it 0"),
    ("ivf_flat", dict(hnsw_m=16), "hnsw_m applies to index hnsw, not 'ivf_flat'; leave it 0"),
    ("ivf_pq", dict(ef_construction=40), "ef_construction applies to index hnsw, not 'ivf_pq'; leave it 0"),
    ("flat", dict(train_min_rows=100), "train_min_rows applies to index ivf_flat, ivf_pq or hnsw, not 'flat'"),
])
def test_hnsw_options_on_another_index_are_refused(index, options, message):
    with pytest.raises(InvalidArgument) as refused:
        NamespaceConfig(name="n", dim=8, index=index, **options)
    assert message in refused.value.message
