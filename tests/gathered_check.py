"""Run by tests/test_collapse_rules.py under `torchrun --nproc_per_node 2` (gloo): the EMA teacher, sharded as
train.py shards it (every unit, the root included, resharded after its forward), samples answers of UNEVEN length
on the two ranks inside parallel.gathered. The block must issue no collective after its one gather, so the ranks
cannot fall out of step; the counts of FSDP all-gathers are written per rank.

    python tests/gathered_check.py MODEL_DIR DATA_ROOT OUT.json
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import model as modeling  # noqa: E402
import rollout  # noqa: E402
from scale import parallel  # noqa: E402

model_dir, data_root, out_path = sys.argv[1:4]
rank, world_size, device = parallel.setup_distributed(torch.device("cpu"), timeout_minutes=1)
teacher = parallel.load_sharded_teacher(model_dir, device, torch.float32)
tokenizer, image_processor = modeling.load_processors(model_dir)
records = data.load_split("slake", data_root, "test")[rank:rank + 1]
prompt = rollout.build_inputs(tokenizer, image_processor, records)

gathers = []
real = _fsdp_param_group.foreach_all_gather
_fsdp_param_group.foreach_all_gather = lambda *a, **k: gathers.append(1) or real(*a, **k)
with parallel.gathered(teacher, torch.float32):
    at_entry = len(gathers)
    out = rollout.sample(teacher, tokenizer, prompt, 2, 2 + 4 * rank, 1.0, 1.0, torch.Generator().manual_seed(0))
    _, hidden = rollout.teacher_forced(teacher, prompt, out, 2, torch.float32)  # FPL's pass, inside the block
    inside = len(gathers) - at_entry
_fsdp_param_group.foreach_all_gather = real
counts = parallel.gather_lists([(at_entry, inside, out.completion_ids.shape[1])])
if rank == 0:
    Path(out_path).write_text(json.dumps(counts))
parallel.shutdown()
parallel.end_worker()
