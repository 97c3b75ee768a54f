"""checkstream.yaml: the typed model, the YAML loader with file:line errors, and fleet checks
(every process)."""
