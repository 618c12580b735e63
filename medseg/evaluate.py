"""``medseg evaluate`` (and ``python -m medseg.evaluate``): the Hydra entry point of re-evaluation, nothing else.

What it runs is :func:`medseg.workflows.evaluation.evaluate`: the test cases of a finished run predicted on their
native grid and scored into its ``summary.json`` (``conf/evaluate.yaml``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from medseg.config import CONFIG_DIR
from medseg.workflows.evaluation import evaluate

__all__ = ["main"]


def main() -> None:
    """Hydra entry point (``python -m medseg.evaluate``); ``medseg evaluate`` calls it with the overrides."""

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
    def _main(cfg: DictConfig) -> None:
        evaluate(cfg)

    _main()


if __name__ == "__main__":
    main()
