"""What a guardrail check found, counted, logged and kept for the audit trail (worker process).

Every phase (ingress, midstream, egress) reports here the same way; the exchange and the
answer handlers act on the verdict, this module only records it. Never the text itself: a
trigger's log line and audit record carry the rule, score and ids, and an excerpt only for
tenants whose audit includes redacted content.
"""

from __future__ import annotations

from checkstream.accounting.accounts import Tally, iso_now
from checkstream.gateway.runtime import Runtime, TenantPlan
from checkstream.ops import logs
from checkstream.ops.metrics import CLASSIFIER_ERRORS, LATENCY, POLICY_TRIGGERS
from checkstream.policy.pipeline import Verdict

log = logs.get("checkstream.policy")


def observe(
    runtime: Runtime,
    plan: TenantPlan,
    tally: Tally | None,
    phase: str,
    verdict: Verdict,
    elapsed_ms: float,
    texts: list[str],
) -> None:
    """One check of an answer: its latency, then its failure or its triggers."""
    LATENCY.labels(plan.tenant.id, phase).observe(elapsed_ms)
    if verdict.failure is not None:
        fails_open(plan, verdict, phase)
    elif verdict.action is not None:
        record(runtime, plan, tally, verdict, phase, texts)


def record(
    runtime: Runtime,
    plan: TenantPlan,
    tally: Tally | None,
    verdict: Verdict,
    phase: str,
    texts: list[str],
) -> None:
    """Count and log each trigger; keep its audit record on the request's tally."""
    tenant = plan.tenant.id
    for trigger in verdict.triggers:
        rule = trigger.rule
        POLICY_TRIGGERS.labels(tenant, rule.name, rule.action).inc()
        fields: dict[str, object] = {
            "tenant": tenant,
            "phase": phase,
            "rule": rule.name,
            "action": rule.action,
            "classifier": rule.classifier,
            "score": round(trigger.score, 4),
            "threshold": rule.threshold,
            "regulation": rule.regulation,
        }
        if tally is not None:
            fields["request_id"] = tally.request_id
            fields["model"] = tally.model
            if rule.name not in tally.rules:
                tally.rules.append(rule.name)
            entry: dict[str, object] = {"time": iso_now(), "type": "trigger", **fields}
            if runtime.accounts.audit.audits(tenant):
                excerpt = runtime.excerpt(tenant, texts)
                if excerpt is not None:
                    entry["excerpt"] = excerpt
            tally.triggers.append(entry)
        log.info("policy_trigger", **fields)


def fails_open(plan: TenantPlan, verdict: Verdict, phase: str) -> bool:
    """Count and log a failed check; True if the tenant's fail mode lets traffic pass."""
    tenant = plan.tenant
    CLASSIFIER_ERRORS.labels(tenant.id, verdict.failed_classifier or "unknown").inc()
    log.error(
        "classifier_failure",
        tenant=tenant.id,
        phase=phase,
        error=verdict.failure,
        fail_mode=tenant.config.fail_mode,
    )
    return tenant.config.fail_mode == "open"
