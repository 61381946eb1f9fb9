"""Tuning the fusion head: search_space (the user's YAML) -> feature_cache -> head_trainer -> study
(Optuna, nested MLflow runs, the final run); workers share a study across processes and machines."""
