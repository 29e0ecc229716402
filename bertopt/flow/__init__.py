"""The flows a command runs, data moving forward: export, run (and optimize), sweep (local or on Ray)."""
