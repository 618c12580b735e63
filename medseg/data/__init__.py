"""Reading CT/MRI files and nnU-Net/MSD datasets, and the MONAI transform pipelines that keep geometry exact."""
