"""Builders of ready-to-use datasets in the nnU-Net v2 raw layout (``medseg prepare NAME``)."""
