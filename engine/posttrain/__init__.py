"""Post-training: SFT, Mixed Preference Optimization (MPO) and a visual process reward model (VisualPRM)."""
