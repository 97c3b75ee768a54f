"""``audit.on_store_failure: refuse``: a tenant that must not be served unrecorded (worker).

By default (``serve``) a full disk or a broken audit directory costs records, not traffic:
every failed write is logged and counted (``checkstream_extproc_errors_total``), and
requests go on. A compliance tenant can choose ``refuse`` instead: once a write of its
audit trail or of the usage ledger has failed, its requests get a 503 in its own format
until a write succeeds again.

The refused requests themselves are the probe: each one is accounted like any other, so
its own ledger row and audit record are attempted, and the first that lands lifts the
refusal. A request already being answered when the store broke cannot be recalled (a
stream is on its way to the client); its failed records are logged with its request id.
"""

from __future__ import annotations

from checkstream.accounting.accounts import Accounts
from checkstream.config.model import TenantConfig

#: The error code of the refusal, in the tenant's error format.
STORE_UNAVAILABLE = "store_unavailable"


def store_refusal(accounts: Accounts, tenant: str, config: TenantConfig) -> str | None:
    """Why ``tenant``'s request must be refused now (a message for the client), or None."""
    audit = config.audit
    if audit is None or audit.on_store_failure != "refuse":
        return None
    ledger = accounts.ledger
    if ledger is not None and ledger.failing:
        return "the usage ledger cannot be written, so the request was not processed"
    if accounts.audit.failing(tenant):
        return "the audit trail cannot be written, so the request was not processed"
    return None
