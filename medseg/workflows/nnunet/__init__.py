"""nnU-Net v2 as a baseline arm of ``medseg train`` (``+nnunet=2d``, ``+nnunet=3d_fullres``; ``conf/nnunet/``).

The ``nnunetv2`` package itself trains and predicts; medseg decides the cases and the budget and scores the result.
One module per step, in the order a run goes through them:

- :mod:`~medseg.workflows.nnunet.settings`: ``cfg.nnunet`` and the step budget, checked; the missing-extra message.
- :mod:`~medseg.workflows.nnunet.raw_dataset`: the run's nnU-Net raw dataset, ``splits_final.json``, the folders.
- :mod:`~medseg.workflows.nnunet.workflow`: ``train_nnunet`` (what ``medseg train`` dispatches to): the run folder,
  nnU-Net's child process, the scoring into ``summary.json``.
- :mod:`~medseg.workflows.nnunet.worker`: nnU-Net's process: fingerprint, plan, preprocess, train, predict.
- :mod:`~medseg.workflows.nnunet.trainer`: nnU-Net's trainer stopped after ``trainer.max_steps`` iterations.

Nothing is imported here: ``worker`` and ``trainer`` import ``nnunetv2``, an optional extra that reads its folders
from the environment at import, so only nnU-Net's own process may import them.
"""

from __future__ import annotations
