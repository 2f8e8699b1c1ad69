"""experiments/gpu_check.py's code paths on CPU (--smoke, a tiny random model): every part runs and records what
the GPU run will be read for. The GPU itself is checked only when a GPU machine is lent (docs/scale.md)."""

import json

from experiments import gpu_check


def test_the_gpu_check_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gc.json"
    gpu_check.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["cudnn"]["cudnn_off"]["finite_gradients"] and result["cudnn"]["tokens"] == 320
    prefix = result["prefix"]
    assert prefix["finite"] and prefix["max_abs_difference"]["logits"] < 0.05 * prefix["logits_scale"]  # bf16 rounding
    for name, run in result["train"].items():
        assert run["exit_code"] == 0 and run["steps"] == 2 and run["evaluations"] == 3, (name, run["log_tail"])
        assert run["kl_step1"] == 0.0 and run["finite_grad_norms"]  # bf16 under torchrun: FSDP2, exact KL 0
        assert any("host memory per node" in line for line in run["plan"])
