"""`relevance generate`: build the synthetic world from a preset (plus overrides) and write it.

    relevance generate --out world --preset demo --seed 0 --set world.n_products=5000
    relevance generate --out world --preset tests --set experiment_series=[0.8,0.5,0.3,0.1]

`experiment_series` adds one A/B experiment per treatment ranker noise on the same world, each under
`out`/experiments/<experiment_id>/ (its logs and experiment.json), for judging offline metrics against online ones.

`world` holds WorldConfig fields that override the preset (`world.experiment.aa=true` for the
nested experiment block); `seed` is top level so that the command line can set it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.world.config import PRESETS, WorldConfig
from jobs.world.generate import STAGES, generate_experiment_series, generate_world, write_experiment_series, write_world
from schemas.config import ConfigError, help_field
from schemas.logs import progress

log = logging.getLogger(__name__)

SERIES_FOLDER = "experiments"


@dataclass(frozen=True)
class GenerateConfig:
    out: Path = help_field("Output folder for the world's tables and world.json.", Path("world"))
    preset: str = help_field(f"Size preset: {', '.join(PRESETS)}.", "demo", choices=tuple(PRESETS))
    seed: int = help_field("Random seed (the same seed gives byte-identical tables).", 0)
    world: dict[str, Any] = help_field(
        "WorldConfig fields overriding the preset, e.g. world.n_products=5000, world.experiment.aa=true.", {}
    )

    experiment_series: tuple[float, ...] = help_field(
        "Treatment ranker noises of further experiments on this world, written under OUT/experiments/ (empty: none).", ()
    )

    def __post_init__(self) -> None:
        if any(noise < 0 for noise in self.experiment_series):
            raise ConfigError(f"experiment_series: noises must be >= 0, got {list(self.experiment_series)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
        if "seed" in self.world:
            raise ConfigError("world.seed: set the seed with the top-level `seed` key (--seed)")
        self.world_config()  # validates the overrides now, with their names

    def world_config(self) -> WorldConfig:
        return WorldConfig.preset(self.preset, seed=self.seed, **self.world)


def run(config: GenerateConfig) -> Path:
    """Generate the world, write it under `config.out`; returns the path of world.json."""
    world_config = config.world_config()
    with progress(total=len(STAGES) + 1, desc="generate world", unit="stage") as bar:
        def stage_done(stage: str) -> None:
            if stage != STAGES[0]:
                bar.update(1)
            bar.set_postfix(stage=stage)

        world = generate_world(world_config, stage_done)
        bar.update(1)
        bar.set_postfix(stage="write")
        manifest = write_world(world, config.out)
        bar.update(1)
    rows = ", ".join(f"{name}={count:,}" for name, count in world.manifest["rows"].items())
    log.info("wrote the %s world (seed %d) to %s: %s", config.preset, config.seed, config.out, rows)
    if config.experiment_series:
        written = write_experiment_series(generate_experiment_series(world_config, config.experiment_series),
                                          Path(config.out) / SERIES_FOLDER)
        log.info("wrote %d more experiments under %s: %s", len(written), Path(config.out) / SERIES_FOLDER,
                 ", ".join(path.parent.name for path in written))
    return manifest
