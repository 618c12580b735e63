"""DDP with two processes on CPU (gloo): the run trains and both ranks end with the same weights, each rank's samples
drawn by a persistent worker process (Lightning's distributed sampler passes the (case, epoch) keys through)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_ddp_two_cpu_processes_agree(small_synthetic_root, tmp_path):
    run_dir, digests = tmp_path / "run", tmp_path / "digests"
    command = [
        sys.executable, "-m", "medseg.train",
        "experiment=synthetic_unet", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.max_steps=3",
        "trainer.check_val_every_n_epoch=1000", "evaluate=false", "resume=false",
        "model.channels=[8,16,32]", "model.strides=[2,2]", "model.num_res_units=1",
        "data.sampling.size=32", "data.batch_size=1", "data.num_workers=1", "logger=csv",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
        "+callbacks.weights_digest._target_=medseg.tasks.callbacks.WeightsDigest",
        f"+callbacks.weights_digest.output_dir={digests}",
        f"paths.data_dir={small_synthetic_root}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_DATA": str(small_synthetic_root)}
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = (digests / "rank0.txt").read_text().split()
    rank1 = (digests / "rank1.txt").read_text().split()
    assert rank0[1] == rank1[1] == "3"  # both ranks did the 3 optimisation steps
    assert rank0[0] == rank1[0]  # identical weights after gradient all-reduce
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
