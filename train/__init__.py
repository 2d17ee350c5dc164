"""Stage 2: the MR-MAE student (masking.py, models.py, students/), trained from the feature cache or a live teacher."""
