"""Choosing and promoting models: comparison (tables of runs) and selection (the best run) ->
aliases (register, rollback) -> promotion (the gate of the policy in registry/gate.yaml)."""
