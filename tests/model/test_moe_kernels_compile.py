"""The fused-MoE kernels compile for sm_90 and sm_80 (ptxas included) with shared memory that fits, without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_cuda_targets(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run([sys.executable, str(HERE / "moe_kernels_aot.py"), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("shared memory") == 5 and "TOO MUCH" not in result.stdout
