import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import pytest

from schemas.config import ConfigError, config_date, config_to_dict, help_field, load_config


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
