import subprocess
import sys
from pathlib import Path


def test_one_pretraining_step_under_torchrun_with_two_ranks(tmp_path):
    script = Path(__file__).parent / "ddp_pretrain_step.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(script), str(tmp_path / "pretrain")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 2
    assert (tmp_path / "pretrain" / "pretrained.safetensors").exists()  # written by rank 0
