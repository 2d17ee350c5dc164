"""Stage 2: the MR-MAE student (masking.py, models.py), trained from the feature cache or a live teacher."""
