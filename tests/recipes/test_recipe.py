"""Recipes: presets, validation messages that name the bad field, files, overrides, digests."""

from __future__ import annotations

import json

import pytest
import yaml

from lowbit import LowbitError
from lowbit.algorithms import RTN
from lowbit.codecs import IntCodec
from lowbit.recipes import PRESET_HELP, Recipe, get_preset, preset_names, resolve_recipe

EXPECTED = {
    "int8": (8, True, "channel", None),
    "w8a16": (8, True, "channel", None),
    "w4a16": (4, True, "group", 128),
    "w4a16-asym": (4, False, "group", 128),
    "w4a16-g64": (4, True, "group", 64),
    "w4a16-asym-g64": (4, False, "group", 64),
    "w3a16": (3, True, "group", 64),
    "w3a16-asym": (3, False, "group", 64),
    "w2a16": (2, True, "group", 64),
    "w2a16-asym": (2, False, "group", 64),
}


@pytest.mark.parametrize("name", preset_names())
def test_presets_resolve(name: str) -> None:
    r = resolve_recipe(name)
    assert r == get_preset(name)
    assert r.name == name and r.label() == name
    # RTN presets that calibrate: a transform's statistics, static input scales
    calibrated_rtn = {"w8a8-smoothquant", "w8a8-static", "w8a8-static-channels"}
    calibrated = name.endswith(("-gptq", "-awq", "-imatrix")) or name in calibrated_rtn
    assert isinstance(r.algorithm, RTN) != name.endswith(("-gptq", "-awq"))
    assert r.needs_calibration == calibrated
    if calibrated:  # the calibration: 128 x 512 tokens of the built-in calibration split
        assert r.calibration is not None
        assert (r.calibration.source, r.calibration.samples, r.calibration.seq_len) == ("pydoc-calib", 128, 512)
        suffix = "rtn" if name in calibrated_rtn else name.rsplit("-", 1)[1]
        assert r.algorithm.name == {"imatrix": "rtn"}.get(suffix, suffix)
    assert name in PRESET_HELP
    if name in EXPECTED:  # the integer presets of the walking skeleton
        c = r.codec
        assert isinstance(c, IntCodec)
        assert (c.bits, c.symmetric, c.granularity, c.group_size) == EXPECTED[name]
    # serializes and comes back equal
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("name", [n for n in preset_names() if n.endswith("-gptq")])
def test_gptq_presets_run_the_measured_column_order(name: str) -> None:
    """int/NF4 GPTQ presets quantize in act-order with static groups (the lower KLD measured on both
    texts, storable by every format); GGUF GPTQ presets keep column order, as their rows were measured."""
    g = get_preset(name).algorithm
    assert g.static_groups
    assert g.act_order == (not name.startswith("gguf-"))


def test_all_presets_known() -> None:
    assert set(EXPECTED) <= set(preset_names())
    assert set(PRESET_HELP) == set(preset_names())


@pytest.mark.parametrize(
    ("data", "field", "detail"),
    [
        ({"codec": {"name": "int", "bits": 9}}, "codec.bits", "less than or equal to 8"),
        ({"codec": {"name": "int", "bits": 1}}, "codec.bits", "greater than or equal to 2"),
        ({"codec": {"name": "int", "bits": 4, "foo": 1}}, "codec.foo", "Extra inputs"),
        ({"codec": {"name": "int", "group_size": 0}}, "codec.group_size", "greater than 0"),
        ({"codec": {"name": "int7"}}, "codec", "unknown codec name 'int7'"),
        ({"codec": "int"}, "codec", "mapping"),
        ({"codec": {"name": "int"}, "algorithm": {"name": "rtn", "clip_min": 0}}, "algorithm.clip_min", "greater than 0"),
        ({"codec": {"name": "int"}, "algorithm": {"name": "gptq-ish"}}, "algorithm", "unknown algorithm name"),
        ({"codec": {"name": "int"}, "algorithm": {"name": "rtn", "bogus": True}}, "algorithm.bogus", "Extra inputs"),
        ({"codec": {"name": "int"}, "bogus": 1}, "bogus", "Extra inputs"),
        ({"codec": {"name": "int"}, "dense_dtype": "float64"}, "dense_dtype", "float16"),
        ({"codec": {"name": "int"}, "version": 2}, "version", "1"),
        ({}, "codec", "Field required"),
    ],
)
def test_bad_field_is_named(data: dict, field: str, detail: str) -> None:
    with pytest.raises(LowbitError) as ei:
        Recipe.from_dict(data)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("invalid recipe: ")
    assert f"{field}: " in msg, msg
    assert detail in msg, msg


def test_several_bad_fields_all_named() -> None:
    with pytest.raises(LowbitError) as ei:
        Recipe.from_dict({"codec": {"name": "int", "bits": 12}, "extra": 1})
    assert "codec.bits" in str(ei.value) and "extra" in str(ei.value)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_recipe_files(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    data = {
        "name": "mine",
        "codec": {"name": "int", "bits": 3, "symmetric": False, "group_size": 32},
        "algorithm": {"name": "rtn", "clip_search": True},
        "targets": ["model.layers.0.*"],
        "ignore": ["*.down_proj"],
        "dense_dtype": "bfloat16",
    }
    p = tmp_path / f"r{suffix}"
    p.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    r = resolve_recipe(str(p))
    assert r.name == "mine"
    assert r.codec == IntCodec(bits=3, symmetric=False, group_size=32)
    assert r.algorithm == RTN(clip_search=True)
    assert r.targets == ["model.layers.0.*"] and r.ignore == ["*.down_proj"] and r.dense_dtype == "bfloat16"
    assert Recipe.from_file(p) == r


def test_recipe_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("codec:\n  name: int\n  bits: 4\n  wat: 3\n")
    with pytest.raises(LowbitError, match=r"codec\.wat"):
        resolve_recipe(str(bad))
    with pytest.raises(LowbitError, match=str(bad)):
        resolve_recipe(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LowbitError, match="not valid JSON"):
        resolve_recipe(str(broken))
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("codec: [unclosed\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        resolve_recipe(str(broken_yaml))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(LowbitError, match="mapping"):
        resolve_recipe(str(listy))
    with pytest.raises(LowbitError, match="not found"):
        resolve_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(LowbitError, match="unknown preset 'w5a16'") as ei:
        resolve_recipe("w5a16")
    assert "w4a16" in str(ei.value)  # lists the presets
    with pytest.raises(LowbitError, match="unknown preset"):
        get_preset("nope")


def test_overrides() -> None:
    r = resolve_recipe("int8", group_size=64)
    assert (r.codec.granularity, r.codec.group_size, r.codec.bits) == ("group", 64, 8)
    r = resolve_recipe("w4a16", bits=3, group_size=None)
    assert (r.codec.bits, r.codec.group_size) == (3, 128)
    r = resolve_recipe("w4a16-asym", group_size=32)
    assert (r.codec.symmetric, r.codec.group_size) == (False, 32)
    assert resolve_recipe("w4a16", bits=None) == get_preset("w4a16")
    with pytest.raises(LowbitError, match=r"codec\.bits"):
        resolve_recipe("w4a16", bits=9)
    with pytest.raises(LowbitError, match=r"codec\.group_size"):
        resolve_recipe("w4a16", group_size=0)


def test_selects() -> None:
    r = Recipe.from_dict({"codec": {"name": "int"}, "targets": ["model.layers.1.*", "*.q_proj"],
                          "ignore": ["*.mlp.down_proj"]})
    assert r.selects("model.layers.1.mlp.up_proj")
    assert r.selects("model.layers.0.self_attn.q_proj")
    assert not r.selects("model.layers.1.mlp.down_proj")
    assert not r.selects("model.layers.0.mlp.up_proj")
    assert not r.selects("model.layers.10.mlp.up_proj")  # fnmatch, not a prefix
    default = Recipe.from_dict({"codec": {"name": "int"}})
    assert default.selects("anything.at.all") and default.targets == ["*"] and default.ignore == []


def test_digest() -> None:
    a = resolve_recipe("w4a16")
    assert a.digest() == resolve_recipe("w4a16").digest()
    assert len(a.digest()) == 12
    # the name is a label, not part of the result
    renamed = Recipe.from_dict({**a.to_dict(), "name": "other"})
    assert renamed.digest() == a.digest()
    changes = [
        {"codec": {**a.to_dict()["codec"], "group_size": 64}},
        {"codec": {**a.to_dict()["codec"], "symmetric": False}},
        {"algorithm": {"name": "rtn", "clip_search": True}},
        {"targets": ["model.*"]},
        {"ignore": ["*.q_proj"]},
        {"dense_dtype": "bfloat16"},
    ]
    digests = {a.digest()}
    for change in changes:
        d = Recipe.from_dict({**a.to_dict(), **change}).digest()
        assert d not in digests, change
        digests.add(d)
    assert resolve_recipe("int8").digest() == resolve_recipe("w8a16").digest()  # same content


def test_recipe_is_frozen() -> None:
    r = resolve_recipe("w4a16")
    with pytest.raises(Exception):
        r.dense_dtype = "float32"  # type: ignore[misc]


def test_regex_and_glob_patterns_and_rules() -> None:
    r = Recipe.from_dict({
        "codec": {"name": "int", "bits": 4},
        "targets": ["re:model\\.layers\\.[0-9]+\\.(self_attn|mlp)\\..*"],
        "ignore": ["*.layers.3.*"],
        "rules": [{"match": "*.down_proj", "codec": {"name": "int", "bits": 8, "granularity": "channel"}}],
    })
    assert r.assignment("model.layers.0.self_attn.q_proj")[0].bits == 4
    assert r.assignment("model.layers.0.mlp.down_proj")[0].bits == 8
    assert r.assignment("model.layers.3.mlp.down_proj") is None
    assert r.assignment("lm_head") is None
    back = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.digest() == r.digest()


def test_bad_regex_names_the_field() -> None:
    with pytest.raises(LowbitError, match="ignore: bad regular expression"):
        Recipe.from_dict({"codec": {"name": "int", "bits": 4}, "ignore": ["re:(unclosed"]})


def test_recipes_without_rules_keep_their_digest() -> None:
    # rules/calibration are left out of the serialized form when unset, so old digests hold
    r = Recipe.from_dict({"codec": {"name": "int", "bits": 4}})
    assert "rules" not in r.to_dict() and "calibration" not in r.to_dict()


def test_codec_and_algorithm_overrides_by_name() -> None:
    r = resolve_recipe("gguf-q4_k_m", algorithm="gptq", clip_search=True)
    assert r.algorithm.name == "gptq" and r.algorithm.clip_search and r.gguf_mix == "q4_k_m"  # type: ignore[attr-defined]
    assert r.name is None and r.needs_calibration
    r = resolve_recipe("w4a16", codec="q4_k")
    assert r.codec.name == "q4_k" and r.algorithm.name == "rtn"
    r = resolve_recipe("w4a16", codec="int", bits=3, group_size=32)
    assert (r.codec.bits, r.codec.group_size) == (3, 32)  # type: ignore[attr-defined]
    with pytest.raises(LowbitError, match="unknown codec name 'q9_k'"):
        resolve_recipe("w4a16", codec="q9_k")
