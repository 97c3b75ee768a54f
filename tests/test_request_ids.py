"""Request ids: a client's valid id is kept, anything else replaced (request_ids.py)."""

from __future__ import annotations

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders

from checkstream.gateway.mutations import TO_ADMIN, header_map, immediate
from checkstream.intake.request_ids import is_valid, request_id, stamp, with_request_id


@pytest.mark.parametrize(
    "rid", ["a", "A.b_c:d-1", "x" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"]
)
def test_plain_short_ids_are_kept(rid: str) -> None:
    assert is_valid(rid) and request_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "x" * 129, "a b", "a;b", "ü", "a\nb", "a/b", None])
def test_anything_else_gets_a_new_id(rid: str | None) -> None:
    fresh = request_id(rid)
    assert fresh != rid and is_valid(fresh)
    assert request_id(rid) != fresh  # new each time


def _headers(**pairs: str) -> HttpHeaders:
    values = [HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in pairs.items()]
    return HttpHeaders(headers=HeaderMap(headers=values))


def test_stamp_keeps_a_valid_id_and_replaces_or_adds_others() -> None:
    kept = _headers(x_request_id="abc")
    assert stamp(kept) is None and header_map(kept)["x-request-id"] == "abc"
    bad = _headers(x_request_id="a b")
    fresh = stamp(bad)
    assert fresh is not None and header_map(bad)["x-request-id"] == fresh
    missing = _headers(host="x")
    added = stamp(missing)
    assert added is not None and header_map(missing)["x-request-id"] == added


def test_the_new_id_reaches_the_forwarded_request_or_the_immediate_response() -> None:
    forwarded = with_request_id(TO_ADMIN, "new-1")
    sets = forwarded.request_headers.response.header_mutation.set_headers
    assert ("x-request-id", b"new-1") in [(h.header.key, h.header.raw_value) for h in sets]
    assert "x-request-id" not in str(TO_ADMIN)  # the shared constant is untouched
    refused = with_request_id(immediate(403, b"{}"), "new-2")
    sets = refused.immediate_response.headers.set_headers
    assert ("x-request-id", b"new-2") in [(h.header.key, h.header.raw_value) for h in sets]
