"""Run by tests/test_gpu_path.py under `torchrun --nproc_per_node 2` (gloo): host memory of a sharded load.

    python tests/lean_load_check.py MODEL_DIR OUT.json

Each rank loads the policy (fp32) and the reference (bf16) with parallel.load_sharded and reports how far its
memory rose above where it started: the peak resident set (Linux VmHWM, reset through /proc/self/clear_refs)
and the peak of its anonymous memory (RssAnon, sampled every millisecond: the resident set less the pages of
mapped files, here the checkpoint that rank 0 reads through a memory map).
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale import parallel  # noqa: E402


def status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM: peak since the last reset, RssAnon), in KiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def sample_anon(peak, done):
    while not done.is_set():
        peak[0] = max(peak[0], status_kib("RssAnon"))
        time.sleep(0.001)


model_dir, out_path = sys.argv[1:3]
rank, world_size, device = parallel.setup_distributed(torch.device("cpu"))
parallel.barrier()
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
start_rss, start_anon = status_kib("VmRSS"), status_kib("RssAnon")
peak_anon, done = [start_anon], threading.Event()
sampler = threading.Thread(target=sample_anon, args=(peak_anon, done))
sampler.start()
policy, reference, _, _ = parallel.load_sharded(model_dir, model_dir, device, torch.bfloat16)
done.set()
sampler.join()
rises = parallel.gather_lists([{"rss": (status_kib("VmHWM") - start_rss) * 1024,
                                "anon": (max(peak_anon[0], status_kib("RssAnon")) - start_anon) * 1024}])
fp32_bytes = 4 * sum(p.numel() for p in policy.parameters())  # DTensor numel: the full tensor's
if rank == 0:
    Path(out_path).write_text(json.dumps({"rises": rises, "fp32_bytes": fp32_bytes}))
parallel.shutdown()
parallel.end_worker()
