"""Who a request belongs to: resolution, keys, address allow-lists, onboarding and offboarding
(worker, CLI)."""
