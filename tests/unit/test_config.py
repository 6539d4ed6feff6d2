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
    (dict(dim=8, index="hnsw"), "unknown index 'hnsw'"),
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
