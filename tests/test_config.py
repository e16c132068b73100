import glob
import os

import pytest

from mkt_torchrec.config import ConfigError, load_config

from tests.conftest import QUICKSTART, REPO


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_every_shipped_config_loads():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path)
        assert cfg.schema.features, path


def test_overrides_are_typed_and_applied():
    cfg = load_config(QUICKSTART, ["data.batch_size=64", "schema.tables.item_id.rows=7", "data.shuffle=false"])
    assert cfg.data.batch_size == 64 and cfg.schema.tables["item_id"].rows == 7 and cfg.data.shuffle is False


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=zero", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.bogus=1", "data.bogus"),
        ("schema.tables.item_id.rows=-3", "schema.tables.item_id.rows"),
        ("schema.features.style.entity=null", "schema.features.style.entity"),
        ("schema.features.age.table=nope", "schema.features.age.table"),
        ("schema.sequences.hist_source_items.shared_feature=style", "schema.sequences.hist_source_items.shared_feature"),
        ("schema.tables.item_id.id_mapping=md5", "schema.tables.item_id.id_mapping"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    assert key in str(e.value) and "quickstart.yaml" in str(e.value)


SIDE = "schema.sequences.hist_source_items.side_features"


@pytest.mark.parametrize("overrides, message", [
    ([f"{SIDE}={{brand: hist_source_brands}}"], f"{SIDE}.brand: unknown feature 'brand'"),
    ([f"{SIDE}={{item_id: hist_source_ids}}"], f"{SIDE}.item_id: 'item_id' is the sequence's shared_feature"),
    ([f"{SIDE}={{category: hist_source_categories}}", "schema.tables.category.dim=4"],
     f"{SIDE}.category: table 'category' has dim 4, but the sequence's table 'item_id' has dim 8"),
    ([f"{SIDE}={{category: price_bucket}}"], f"{SIDE}.category: column 'price_bucket' is already used"),
    ([f"{SIDE}={{category: hist_target_items}}"], f"{SIDE}.category: column 'hist_target_items' is already used"),
    ([f"{SIDE}={{category: log_price}}"], f"{SIDE}.category: column 'log_price' is already used"),
    ([f"{SIDE}={{category: label}}"], f"{SIDE}.category: column 'label' is already used"),
    ([f"{SIDE}={{category: hist_target_categories}}"],  # the target sequence's side column in quickstart.yaml
     "schema.sequences.hist_target_items.side_features.category: column 'hist_target_categories' is already used"),
])
def test_bad_side_features_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert message in str(e.value)


def test_side_features_add_jagged_keys_on_the_features_table():
    schema = load_config(QUICKSTART).schema
    assert schema.side_keys == ["hist_source_categories", "hist_target_categories"]
    assert schema.sparse_keys[-2:] == schema.side_keys
    assert schema.table_of("hist_target_categories") == "category"
    assert schema.max_len_of("hist_target_categories") == schema.sequences["hist_target_items"].max_len and schema.max_len_of("category") is None
    off = load_config(QUICKSTART, [f"{SIDE}={{}}", "schema.sequences.hist_target_items.side_features={}"])
    assert off.schema.side_keys == [] and "hist_source_categories" not in off.schema.sparse_keys


def test_missing_schema_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="schema: missing"):
        load_config(_write(tmp_path, "data: {batch_size: 3}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "schema: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_unused_table_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="schema.tables: tables used by no feature"):
        load_config(QUICKSTART, ["schema.tables.orphan.rows=3"])


@pytest.mark.parametrize("kind", ["directory", "binary", "bad yaml"])
def test_unreadable_config_is_a_one_line_error_naming_it(tmp_path, kind, capsys):
    from mkt_torchrec.cli import main

    path = tmp_path / "c.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    else:
        path.write_text("schema: [unclosed\n  - x: {")
    assert main(["synth", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and len(err.splitlines()) == 1, err


def test_table_rows_beyond_int64_are_a_config_error():
    from mkt_torchrec.config import ConfigError, load_config

    from tests.conftest import QUICKSTART

    with pytest.raises(ConfigError, match="item_id.rows: 9223372036854775808 rows cannot be indexed"):
        load_config(QUICKSTART, ["schema.tables.item_id.rows=9223372036854775808"])
