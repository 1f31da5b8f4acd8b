"""Vision towers that turn condition images into features for a backbone (Z-Image's omni
mode reads SigLIP2 features of its source images)."""
