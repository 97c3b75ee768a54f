"""Running the gateway: the launcher, admin server, reloads, Envoy's config, metrics, logs and
fleet tools (launcher process)."""
