"""Stage 2: the MR-MAE student, trained from the feature cache (not built yet)."""
