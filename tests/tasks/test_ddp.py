"""DDP with two processes on CPU (gloo): the run trains and both ranks end with the same weights, each rank's samples
drawn by a persistent worker process (Lightning's distributed sampler passes the (case, epoch) keys through)."""

from __future__ import annotations


def test_ddp_two_cpu_processes_agree(ddp_digests):
    overrides = [
        "experiment=synthetic_unet", "trainer.check_val_every_n_epoch=1000", "model.channels=[8,16,32]",
        "model.strides=[2,2]", "model.num_res_units=1", "data.sampling.size=32", "data.batch_size=1",
        "data.num_workers=1", "logger=csv", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
    ]  # fmt: skip
    rank0, rank1, run_dir = ddp_digests(overrides, steps=3)
    assert rank0[1] == rank1[1] == "3"  # both ranks did the 3 optimisation steps
    assert rank0[0] == rank1[0]  # identical weights after gradient all-reduce
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
