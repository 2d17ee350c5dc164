"""What comes after pretraining, each command a module: `finetune` (+ `finetune_data`,
`layer_decay`), `evaluate` (kNN, linear probe, ensemble), `export` (to timm, the hub layout;
`hub` pushes it), `labels` (labelled tars, for both), `report` (runs side by side) and
`visualize`. They import the pretraining core (`mrmae.train`) and the run machinery
(`mrmae.train.run`); neither imports them.
"""
