"""One `peftcli train`: plan, set up, open the run dir, fit, keep the artifact, report (run.py)."""
