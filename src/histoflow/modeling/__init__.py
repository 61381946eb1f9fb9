"""Models and the training run: variants (settings) -> architectures -> fitting -> metrics, explain,
figures -> training_run (one tracked run of a variant)."""
