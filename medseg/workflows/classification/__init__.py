"""Classification: what ``medseg classify`` runs, and a map of every classification piece in every stage.

Classification reuses the segmentation stack (backbones, adapters, presets, run folders) and adds a piece to each
stage; each piece sits in the stage it belongs to, so the code only ever imports downwards. Where to find what, top
stage first:

- ``medseg/classify.py``: the ``medseg classify`` command, only its Hydra ``main()``.
- :mod:`medseg.workflows.classification.ladder`: the whole ladder, every (init, protocol) arm, and its table.
- :mod:`medseg.workflows.classification.training`: one rung on one dataset (``train_classifier``), the run folder.
- :mod:`medseg.workflows.classification.protocols`: the protocol ladder: kNN and linear-probe fits, ``PROTOCOLS``.
- :mod:`medseg.workflows.classification.features`: the cache of frozen features the kNN and linear rungs share.
- :mod:`medseg.tasks.classification`: the LightningModule of the ``peft`` and ``full`` rungs (loss, optimiser).
- :mod:`medseg.evaluation.classification`: metrics (AUROC, kappa, ECE...), subgroup gaps, ``summary.json``.
- :mod:`medseg.evaluation.tables`: the results table the ladder and ``medseg quickstart`` both print.
- :mod:`medseg.inference.classified`: loading a run folder (``load_classifier``), ``predict_probabilities``,
  ``medseg predict``'s ``probabilities.csv``.
- :mod:`medseg.models.classifier`: backbone + pooling + head, 2-D and 3-D (slice-wise), CNN baselines.
- :mod:`medseg.models.pooling`: token pooling (cls, mean, attention) and slice aggregation.
- :mod:`medseg.models.knn`: the kNN head, saved with the model's weights.
- :mod:`medseg.data.cls_datamodule`: the data module: splits, label budgets, cached preprocessing.
- :mod:`medseg.data.cls_transforms`: loading images and slices, square padding.
- :mod:`medseg.data.classification`: the table of cases and labels, ``LABEL_KINDS``, ``medseg validate``'s check.
- ``conf/classify.yaml`` with ``conf/protocol/``, ``conf/task/classification.yaml``, ``conf/model/classifier*.yaml``,
  ``conf/data/cls_*.yaml`` and ``conf/experiment/cls_quickstart.yaml``: the configs.

Nothing is imported here, so that a caller loads only the step it needs.
"""

from __future__ import annotations

__all__: list[str] = []
