"""The fused-MoE kernels outside the interpreter, on this GPU-less machine: they compile for sm_90, sm_89 and sm_80
(ptxas included) with shared memory that fits, and asking for them where they cannot run is refused."""
import os
import subprocess
import sys
from pathlib import Path

from dots1_reference import build_reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def without_interpreter() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_kernels_compile_for_cuda_targets(tmp_path):
    env = without_interpreter() | {"TRITON_CACHE_DIR": str(tmp_path)}  # compile for real, not from a cache
    result = subprocess.run([sys.executable, str(HERE / "moe_kernels_aot.py"), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("shared memory") == 6 and "TOO MUCH" not in result.stdout


def test_triton_backend_that_cannot_run_is_refused(tmp_path):
    build_reference(tmp_path, num_hidden_layers=2)
    script = ("import torch\n"
              "from model.loader import load_model\n"
              f"load_model({str(tmp_path)!r}, dtype=torch.float32, device='cpu', moe_backend='triton')\n")
    result = subprocess.run([sys.executable, "-c", script], env=without_interpreter(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert ("ValueError: --moe-backend triton: the triton MoE backend failed its self-check (check_fused_moe) on cpu"
            in result.stderr)
