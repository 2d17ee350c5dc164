"""The paper's recipes and one per row of its tables 3 and 4, as `--config` YAML files.

They ship inside the package, so `mrmae pretrain --config NAME` (the file name, with or
without `.yaml`) and `mrmae recipes` find them in an installed mrmae (train/run/recipe.py)."""
