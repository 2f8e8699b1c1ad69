"""Write issue 18's rows into docs/ablation.json, beside the rows of issue 15.

docs/ablation.json gains, from this folder's ablation.json (`ablate.py --settings
docs/dev_grid_rules/dev_choices.json --rows ttrl-restrain ...`) and docs/dev_grid_rules/dev_choices.json:
  dev_choices      the new rows' dev-chosen settings (lr and epochs, or lr null = no adaptation) and the dev
                   score of every candidate, added to issue 15's rows
  collapse_rules   the test ablation of the new rows at their own settings: hparams, the table (with the base
                   model's row, the same base models as own_setting), every run, and minus_plain: per row and
                   run, its final overall minus its plain row's (TTRL or Med-Evo in own_setting, same base
                   model), in points (docs/collapse_rules.md's "− its plain row" column)

    python docs/ablation_rules/merge.py
"""

import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(DOCS.parent))
from experiments.ablate import paired  # noqa: E402  (the repository root is not a package)

PLAIN = {"ttrl-restrain": "ttrl", "ttrl-empo": "ttrl", "ttrl-ema": "ttrl", "evol-rl": "ttrl",
         "medevo-restrain": "medevo", "medevo-ema": "medevo", "medevo-novelty": "medevo"}  # entropy: no plain row

merged = json.loads((DOCS / "ablation.json").read_text())
rules = json.loads((DOCS / "ablation_rules" / "ablation.json").read_text())
dev = json.loads((DOCS / "dev_grid_rules" / "dev_choices.json").read_text())
merged["dev_choices"].update({key: {k: row[k] for k in ("name", "choice", "candidates")}
                              for key, row in dev["rows"].items()})
merged["collapse_rules"] = {k: rules[k] for k in ("hparams", "settings", "fixed", "base_seeds", "rl_seeds",
                                                  "run_ids", "base_premises_met", "rows", "runs",
                                                  "by_content_type") if k in rules}
assert rules["run_ids"] == merged["own_setting"]["run_ids"], "the plain rows ran on other base models"
merged["collapse_rules"]["minus_plain"] = {
    key: paired({key: rules["runs"][key], plain: merged["own_setting"]["runs"][plain]}, key, plain)
    for key, plain in PLAIN.items() if rules["hparams"][key] != "none"}
(DOCS / "ablation.json").write_text(json.dumps(merged, indent=1))
print(f"wrote {DOCS / 'ablation.json'}: dev_choices (+{len(dev['rows'])} rows), "
      f"collapse_rules ({len(rules['rows']) - 1} rows)")
