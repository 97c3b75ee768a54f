"""Guardrails: policy files, compiled plans, the classifier pipeline, midstream checks, the
plugin registry and the classifier server (worker, classifier server)."""
