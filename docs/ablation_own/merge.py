"""Write the per-row results into docs/ablation.json, beside the table at the oracle's setting (issue 15).

docs/ablation.json keeps what `ablate.py --out runs/ablation` wrote (every row at the oracle's setting) and
gains three keys from docs/ablation_own/ablation.json (`ablate.py --settings docs/dev_grid/dev_choices.json`):
  dev_choices  per row: its dev-chosen setting (lr and epochs, or lr null = no adaptation) and the dev score
               of every candidate (docs/dev_grid/dev_choices.json)
  own_setting  the test ablation with each row at its own setting: hparams, the table, every run
  break_even   the noisy-oracle sweep on base model 0, p* (asked and measured on contested groups) and each
               label-free row's contested hit rate

    python docs/ablation_own/merge.py
"""

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]

oracle_setting = json.loads((DOCS / "ablation.json").read_text())
own = json.loads((DOCS / "ablation_own" / "ablation.json").read_text())
dev = json.loads((DOCS / "dev_grid" / "dev_choices.json").read_text())
oracle_setting["dev_choices"] = {key: {k: row[k] for k in ("name", "choice", "candidates")}
                                 for key, row in dev["rows"].items()}
oracle_setting["own_setting"] = {k: own[k] for k in ("hparams", "settings", "fixed", "base_seeds", "rl_seeds",
                                                     "run_ids", "base_premises_met", "rows", "runs",
                                                     "by_content_type") if k in own}
oracle_setting["break_even"] = own.get("break_even")
(DOCS / "ablation.json").write_text(json.dumps(oracle_setting, indent=1))
print(f"wrote {DOCS / 'ablation.json'}: dev_choices, own_setting ({len(own['rows']) - 1} rows), break_even")
