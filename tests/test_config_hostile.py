"""Hostile and careless configs (issue 27, third pass): each is a one-line error naming the file, key or line.

Every case here was silently accepted, crashed or hung before mkt_torchrec/safe_yaml.py and the bounds of
mkt_torchrec/typed.py: a duplicate key kept its last value, aliases expanded without limit, a deep list was a
RecursionError, ``train.threads=100000`` segfaulted, ``mkt plan --world-size 100000`` planned for minutes. The
hang cases are tested by their bound (planning is replaced by a function that fails), never by waiting.
"""

import os

import pytest
import yaml

from mkt_torchrec.config import ConfigError, config_from_dict, load_config

from tests.conftest import QUICKSTART


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def _quickstart_with(tmp_path, tail: str) -> str:
    with open(QUICKSTART, encoding="utf-8") as f:
        return _write(tmp_path, f.read() + "\n" + tail)


def _error(path: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message and len(message) < 800, message
    return message


# ------------------------------------------------------------------------------------------------ duplicate keys


def test_a_section_twice_names_the_file_and_both_lines(tmp_path):
    text = open(QUICKSTART, encoding="utf-8").read()
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("data:"))
    path = _write(tmp_path, text + "\ndata:\n  batch_size: 16\n")
    last = len(text.splitlines()) + 2
    message = _error(path)
    assert message.startswith(f"{path}:{last}: duplicate key 'data': also at {path}:{first}"), message


def test_a_key_twice_deep_inside_a_section_is_an_error_too(tmp_path):
    path = _quickstart_with(tmp_path, "tenrec:\n  chunk_rows: 10\n  test_fraction: 0.1\n  chunk_rows: 20\n")
    n = len(open(QUICKSTART, encoding="utf-8").read().splitlines()) + 1
    assert _error(path).startswith(f"{path}:{n + 4}: duplicate key 'chunk_rows': also at {path}:{n + 2}")


def test_equal_keys_spelled_differently_are_duplicates_and_overrides_are_checked_too():
    message = _error(QUICKSTART, ["data.related_items={max_related: 3, max_related: 4}"])
    assert message.startswith(f"{QUICKSTART}: override data.related_items: duplicate key 'max_related'"), message
    with pytest.raises(ConfigError, match="duplicate key 1"):
        load_config(QUICKSTART, ["train.planner.pooling_factors={1: 2.0, 0x1: 3.0}"])  # YAML reads both as 1


# ---------------------------------------------------------------------------------------- aliases and sections


def test_anchors_and_aliases_are_refused_in_a_file(tmp_path):
    path = _quickstart_with(tmp_path, "tenrec:\n  chunk_rows: &b 10\n")
    n = len(open(QUICKSTART, encoding="utf-8").read().splitlines()) + 1
    assert _error(path) == (f"{path}:{n + 2}: anchor &b: anchors and aliases are not allowed in a config (write "
                            "the value out)")


def test_an_alias_bomb_in_an_override_is_refused_before_it_expands():
    bomb = "[&a [1, 2, 3, 4, 5, 6, 7, 8, 9], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], [*b, *b, *b, *b, *b, *b]]"
    message = _error(QUICKSTART, [f"eval.activity_bounds={bomb}"])
    assert message.startswith(f"{QUICKSTART}: override eval.activity_bounds: anchor &a: anchors and aliases"), message


def test_merge_keys_are_refused(tmp_path):
    path = _quickstart_with(tmp_path, "tenrec:\n  <<: {chunk_rows: 3}\n")
    assert "merge keys (<<) are not allowed" in _error(path)


@pytest.mark.parametrize("section", ["report", "extra", "reports"])
def test_an_unknown_top_level_section_is_refused(tmp_path, section):
    path = _quickstart_with(tmp_path, f"{section}:\n  x: [1, 2, 3]\n")
    assert _error(path).startswith(f"{path}: {section}: unknown key; expected one of ['cache', 'data', 'eval'")


def test_a_run_json_of_before_keeps_loading_with_its_empty_extra_section():
    raw = load_config(QUICKSTART).to_dict()
    assert "extra" not in raw
    assert config_from_dict({**raw, "extra": {}}).to_dict() == raw
    with pytest.raises(ConfigError, match=r"^extra: unknown key"):
        config_from_dict({**raw, "extra": {"report": {"x": 1}}})


# ------------------------------------------------------------------------------------------------- size bounds


def test_a_list_of_more_than_max_items_is_refused_in_yaml_and_in_a_run_json():
    from mkt_torchrec.typed import MAX_ITEMS

    bounds = list(range(1, MAX_ITEMS + 2))  # increasing positive ints: valid but for their number
    message = _error(QUICKSTART, [f"eval.activity_bounds={bounds}"])
    assert message == (f"{QUICKSTART}: override eval.activity_bounds: more than {MAX_ITEMS:,} entries in one list "
                        "or mapping"), message
    cfg = load_config(QUICKSTART)
    with pytest.raises(ConfigError, match=rf"^eval\.activity_bounds: {MAX_ITEMS + 1:,} items; at most"):
        cfg.with_settings({"eval.activity_bounds": bounds})
    assert cfg.with_settings({"eval.activity_bounds": bounds[:MAX_ITEMS]}).eval.activity_bounds[-1] == MAX_ITEMS


def test_a_long_string_is_refused_and_quoted_short():
    from mkt_torchrec.typed import MAX_CHARS

    message = _error(QUICKSTART, ["train.planner.plan_file=" + "p" * (MAX_CHARS + 1)])
    assert f"a value of {MAX_CHARS + 1:,} characters ('pppp" in message and f"at most {MAX_CHARS:,}" in message
    with pytest.raises(ConfigError, match=rf"^train\.planner\.plan_file: a string of {MAX_CHARS + 1:,} characters"):
        load_config(QUICKSTART).with_settings({"train.planner.plan_file": "p" * (MAX_CHARS + 1)})


def test_a_bad_value_is_quoted_as_a_short_excerpt():
    message = _error(QUICKSTART, ["data.batch_size=" + "x" * 3000])
    assert message.startswith(f"{QUICKSTART}: data.batch_size: expected an int, got 'xxxx") and len(message) < 200
    message = _error(QUICKSTART, [f"eval.activity_bounds={[5, 3] * 2000}"])  # not increasing: the list is quoted
    assert message.startswith(f"{QUICKSTART}: eval.activity_bounds: expected increasing positive ints, got [5, 3,")


def test_an_int_of_5000_digits_is_a_config_error_not_a_traceback():
    message = _error(QUICKSTART, ["data.seed=" + "9" * 5000])  # was Python's ValueError: "Exceeds the limit (4300
    assert message.startswith(f"{QUICKSTART}: override data.seed: a value of 5,000 characters ('9999"), message


def test_a_free_form_value_is_bounded_too():
    from typing import Any

    from mkt_torchrec.typed import MAX_DEPTH, build

    deep: list = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ConfigError, match=rf"^source\.x: nested more than {MAX_DEPTH} levels deep"):
        build(Any, deep, "source.x")
    with pytest.raises(ConfigError, match=r"^source\.x\[0\]: a string of 5,000 characters"):
        build(list[Any], ["y" * 5000], "source.x")


# ------------------------------------------------------------------------------------------------------ depth


def test_a_list_nested_100000_deep_is_an_error_naming_the_file_and_line(tmp_path):
    path = _quickstart_with(tmp_path, "tenrec:\n  chunk_rows: " + "[" * 100_000 + "]" * 100_000 + "\n")
    n = len(open(QUICKSTART, encoding="utf-8").read().splitlines()) + 1
    assert _error(path) == f"{path}:{n + 2}: nested more than 64 levels deep"
    assert _error(QUICKSTART, ["eval.activity_bounds=" + "[" * 100_000 + "]" * 100_000]) == (
        f"{QUICKSTART}: override eval.activity_bounds: nested more than 64 levels deep")


def test_an_override_key_of_100000_segments_is_an_error():
    assert "more than 64 key segments" in _error(QUICKSTART, ["eval" + ".x" * 100_000 + "=1"])


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path, capsys):
    from mkt_torchrec.cli import main

    path = _quickstart_with(tmp_path, "data:\n  batch_size: 16\n")
    assert main(["plan", "--config", path, "--world-size", "2", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mkt plan: config error: {path}:") and "duplicate key 'data'" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# -------------------------------------------------------------------------------- loader keeps safe_load's reading


def test_shipped_configs_read_as_yaml_safe_load_reads_them():
    import glob
    import os

    from mkt_torchrec.safe_yaml import load
    from tests.conftest import REPO

    paths = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert paths
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert load(text, path) == yaml.safe_load(text), path
    assert load("a: 1e-3\nb: yes\nc: 2026-11-01", "x") == yaml.safe_load("a: 1e-3\nb: yes\nc: 2026-11-01")


def test_a_syntax_error_still_names_the_file_on_one_line(tmp_path):
    path = _write(tmp_path, "schema: [1, 2\n")
    message = _error(path)
    assert message.startswith(f"{path}: not valid YAML:") and f'in "{path}", line' in message


def test_a_file_larger_than_the_bound_is_refused_before_parsing(tmp_path):
    from mkt_torchrec.safe_yaml import MAX_FILE_CHARS

    path = _write(tmp_path, "# " + "x" * MAX_FILE_CHARS + "\n")
    assert _error(path) == f"{path}: more than {MAX_FILE_CHARS:,} characters: too large for a config (configs/ " \
        "hold a few KB)"


# ------------------------------------------------------------------------------------ where the config is used


def test_duckdb_threads_are_bounded():
    logs = os.path.join(os.path.dirname(QUICKSTART), "logs.yaml")
    assert load_config(logs, ["source.threads=1024"]).source.threads == 1024
    assert "source.threads: expected an int in [0, 1024]" in _error(logs, ["source.threads=100000"])


def test_train_threads_is_bounded_on_any_machine():
    assert load_config(QUICKSTART, ["train.threads=1024"]).train.threads == 1024
    for threads in (10_000, 100_000):
        message = _error(QUICKSTART, [f"train.threads={threads}"])
        assert message.startswith(f"{QUICKSTART}: train.threads: {threads} threads per rank; at most 1024"), message


def test_bootstrap_samples_is_bounded():
    assert load_config(QUICKSTART, ["eval.bootstrap_samples=100000"]).eval.bootstrap_samples == 100_000
    message = _error(QUICKSTART, ["eval.bootstrap_samples=1000000000"])
    assert message == (f"{QUICKSTART}: eval.bootstrap_samples: expected an int in [0, 100000], got 1000000000")


@pytest.fixture
def no_planning(monkeypatch):
    """Planning fails at once: a world size that is not refused first fails the test instead of hanging it."""
    from mkt_torchrec.planning import cli

    def refuse(*args, **kwargs):
        raise AssertionError("the planner was started")

    monkeypatch.setattr(cli, "_stage_module", refuse)


@pytest.mark.parametrize("flags", [["--world-size", "100000", "--out", "unused.json"],
                                   ["--compare", "world_size=8,100000"]])
def test_plan_refuses_a_world_size_past_its_limit(no_planning, capsys, flags):
    from mkt_torchrec.cli import main

    assert main(["plan", "--config", QUICKSTART, "--compute-device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 4096" in err and "100000" in err, err
