import dataclasses
import datetime as dt
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from schemas.config import (
    ConfigError,
    MissingConfigKeys,
    config_date,
    config_to_dict,
    field_choices,
    help_field,
    is_required,
    load_config,
)


@dataclass(frozen=True)
class Scale:
    n_products: int = help_field("Products.", 100)
    share: float = help_field("A share in (0, 1].", 0.5)

    def __post_init__(self):
        if not 0 < self.share <= 1:
            raise ConfigError(f"scale.share must be in (0, 1], got {self.share}")


@dataclass(frozen=True)
class Example:
    out: str = help_field("Output folder.", "out")
    engine: Literal["pandas", "spark"] = help_field("Engine.", "pandas")
    seed: int | None = help_field("Seed.", None)
    tables: list[str] = help_field("Tables.", [])
    dry_run: bool = help_field("Do nothing.", False)
    scale: Scale = field(default_factory=Scale, metadata={"help": "Sizes."})


def test_yaml_then_overrides_then_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: from_yaml\nscale:\n  n_products: 7\n  share: 0.25\nseed: 1\n")
    config = load_config(Example, path, ["scale.n_products=9", "tables=a,b", "dry_run=true"], {"seed": 3})
    assert config == Example(out="from_yaml", seed=3, tables=["a", "b"], dry_run=True, scale=Scale(9, 0.25))
    assert config_to_dict(config)["scale"] == {"n_products": 9, "share": 0.25}


def test_configs_are_frozen():
    config = load_config(Example)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.out = "x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nope=1"], r"unknown keys \['nope'\]; known keys"),
        (["scale.nope=1"], r"scale: unknown keys \['nope'\]"),
        (["engine=duck"], r"engine: 'duck' is not one of \['pandas', 'spark'\]"),
        (["scale.n_products=1.5"], "expected a whole number"),
        (["scale.share=2"], r"scale.share must be in \(0, 1\]"),
        (["dry_run=maybe"], "expected true or false"),
        (["seed"], "must look like key=value"),
    ],
)
def test_errors_name_the_key_and_say_what_is_accepted(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Example, None, overrides)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Example, bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scale.n_products=true"], r"scale.n_products: expected a whole number, got True"),
        (["scale.share=false"], r"scale.share: expected a number, got False"),
        (["seed=true"], r"seed: True fits none of"),
        (["dry_run=1"], r"dry_run: expected true or false, got 1"),
        (["dry_run=0.5"], r"dry_run: expected true or false, got 0.5"),
    ],
)
def test_a_bool_is_not_a_number_and_a_number_is_not_a_bool(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Example, None, overrides)


def test_dates_must_be_exactly_yyyy_mm_dd():
    assert config_date("2024-03-13") == dt.date(2024, 3, 13)
    for wrong in ("20240313", "2024-W11-3", "2024-03-1", "2024-02-30", " 2024-03-13", "２０２４-03-13", None, 20240313):
        with pytest.raises(ConfigError, match=r"when: must look like YYYY-MM-DD"):
            config_date(wrong, "when")


@dataclass(frozen=True)
class Night:
    date: str = help_field("Required: no default.")
    mode: str = help_field("A free string checked against a set.", "fast", choices=("fast", "slow"))
    engine: Literal["pandas", "spark"] | None = help_field("An optional Literal.", None)
    scale: Scale = field(default_factory=Scale, metadata={"help": "Sizes."})
    label: str = field(init=False, default="", metadata={"help": "Derived: no config file sets it."})


@dataclass(frozen=True)
class Section:
    root: str = help_field("Required in a section.")


@dataclass(frozen=True)
class WithSection:
    section: Section = help_field("A section with a required key.")


def test_required_keys_given_nowhere_are_named_not_the_constructor():
    with pytest.raises(MissingConfigKeys, match=r"^missing required key date$") as missing:
        load_config(Night, None, ["mode=slow"])
    assert missing.value.keys == ["date"]
    with pytest.raises(MissingConfigKeys) as missing:
        load_config(WithSection)
    assert missing.value.keys == ["section"]
    with pytest.raises(MissingConfigKeys) as missing:
        load_config(WithSection, None, ["section={}"])
    assert missing.value.keys == ["section.root"]
    assert load_config(Night, None, ["date=2024-03-13"]).date == "2024-03-13"


def test_choices_come_from_a_literal_or_the_field_metadata():
    hints = typing.get_type_hints(Night)
    choices = {f.name: field_choices(f, hints[f.name]) for f in dataclasses.fields(Night)}
    assert choices == {"date": (), "mode": ("fast", "slow"), "engine": ("pandas", "spark"), "scale": (), "label": ()}
    assert [f.name for f in dataclasses.fields(Night) if is_required(f)] == ["date"]


def test_settable_only_leaves_out_derived_fields_so_the_dict_loads_back(tmp_path):
    config = load_config(Night, None, ["date=2024-03-13", "scale.n_products=7"])
    assert "label" in config_to_dict(config)
    settable = config_to_dict(config, settable_only=True)
    assert settable == {"date": "2024-03-13", "mode": "fast", "engine": None, "scale": {"n_products": 7, "share": 0.5}}
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump(settable))
    assert load_config(Night, path) == config


def test_check_choices_names_the_field_outside_its_declared_values():
    from schemas.config import check_choices

    @dataclasses.dataclass(frozen=True)
    class Choosing:
        mode: str = help_field("a mode", "a", choices=("a", "b"))
        free: str = help_field("anything", "zzz")

    check_choices(Choosing(mode="b"))
    with pytest.raises(ConfigError, match=r"^mode: 'c' is not one of \['a', 'b'\]$"):
        check_choices(Choosing(mode="c"))
