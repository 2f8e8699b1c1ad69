"""The offline base models: models/tiny-base-seed{0,1,2} (hash-checked by SHA256SUMS) and tiny.py, which builds,
warm-starts, reports and ships them (`python -m models.tiny --seed S`)."""
