"""``medseg train`` (and ``python -m medseg.train``): the Hydra entry point of training, nothing else.

What a training run does is :func:`medseg.workflows.training.train`; the CLI calls :func:`main` with the command's
overrides (:func:`medseg.launch.run_hydra_entry`), after checking the config.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from medseg.config import CONFIG_DIR
from medseg.errors import MedsegError
from medseg.workflows.training import train

__all__ = ["main"]


def main() -> float | None:
    """Hydra entry point (``python -m medseg.train``); ``medseg train`` calls it with the overrides.

    A :class:`~medseg.errors.MedsegError` of a single run is raised after Hydra returns rather than through it, so
    that the user sees its one-line message alone, not Hydra's "Error executing job" report first; in a multirun it
    goes through Hydra, whose report names the failed job's overrides.
    """
    failed: list[MedsegError] = []

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        try:
            metrics = train(cfg)
        except MedsegError as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            failed.append(err)
            return None
        wanted = cfg.get("optimized_metric")
        return metrics.get(wanted) if wanted else None

    result = _main()
    if failed:
        raise failed[0]
    return result


if __name__ == "__main__":
    try:
        main()
    except MedsegError as error:
        print(f"medseg train: error: {error}", file=sys.stderr)
        sys.exit(2)
