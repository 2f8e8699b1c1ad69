"""The harness around the step: its flags (flags.py) and its setup, resume, evaluation and saving
(setup.py). train.py reads these; the method itself is in the stage files."""
