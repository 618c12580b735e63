"""What the commands and the benchmark run: training, evaluation, the classification ladder, models for ``-m``.

This stage sits above the packages that do the work (data, models, tasks, inference, evaluation, release) and below
the thin command modules (``medseg.train``, ``medseg.evaluate``, ``medseg.classify``, ``medseg.quickstart``) and the
benchmark, so that code which needs "a whole training run" imports it from here, never from a command module.
"""
