"""What every training command shares, pretraining and fine-tuning alike: the loop
(`loop.TrainRun`: lr schedule, accumulation, checkpoints, resume, logging), a run's directory
(`run_dir`), its records (`records`: config.json, metrics.jsonl, eval.jsonl), checkpoints
(`checkpoint`), `--config` recipes (`recipe`) and the interruptible loader (`loader`). Nothing
here imports the pretraining core or the downstream commands.
"""
