"""``medseg classify``: one rung of the classification ladder (``protocol=knn|linear|peft|full``), or the whole ladder.

This module is only the Hydra entry point. The work lives in :mod:`medseg.workflows.classification`:
:func:`~medseg.workflows.classification.training.train_classifier` runs one protocol and writes the run folder, and a
config with ``ladder`` set (``experiment=cls_quickstart``) runs every (init, protocol) arm with
:func:`~medseg.workflows.classification.ladder.run_ladder` and prints one table. Nothing imports this module.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medseg.config import CONFIG_DIR
from medseg.workflows.classification.ladder import run_ladder
from medseg.workflows.classification.training import train_classifier

__all__ = ["main"]


def main() -> float | None:
    """Hydra entry point (``python -m medseg.classify``); ``medseg classify`` calls it with the overrides.

    Returns:
        The run's ``optimized_metric`` (for a sweeper), or ``None`` for the ladder.
    """

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classify")
    def _main(cfg: DictConfig) -> float | None:
        if cfg.get("ladder"):
            run_ladder(cfg, list(HydraConfig.get().overrides.task))
            return None
        metrics = train_classifier(cfg)
        wanted = cfg.get("optimized_metric")
        return metrics.get(wanted) if wanted else None

    return _main()


if __name__ == "__main__":
    main()
