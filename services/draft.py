"""The draft service: token proposals for speculative decoding from a draft-proposer plugin
("ngram" built in; a small draft model with the speculative-decoding work)."""
from __future__ import annotations

import json

from tandem.errors import InvalidRequestError
from tandem.v1 import common_pb2, draft_pb2, draft_pb2_grpc

from .common import Registration, rpc
from .metrics import with_rpc_counts

MAX_PROPOSALS = 64
MAX_CONTEXT_TOKENS = 1 << 17


class DraftServicer(draft_pb2_grpc.DraftServicer):
    def __init__(self, plugins=None):
        from tandem.plugins import get_plugin_manager

        self.plugins = plugins or get_plugin_manager()
        self._proposers: dict[tuple[str, str], object] = {}
        self.counters = {"requests": 0, "proposed_tokens": 0}

    def _proposer(self, method: str, options_json: str):
        key = (method, options_json)
        if key not in self._proposers:
            try:
                options = json.loads(options_json) if options_json else {}
            except ValueError as exc:
                raise InvalidRequestError(f"options_json is not valid JSON: {exc}") from None
            if not isinstance(options, dict):
                raise InvalidRequestError("options_json must be a JSON object")
            self._proposers[key] = self.plugins.create("draft_proposer", method or "ngram", options)
        return self._proposers[key]

    @rpc
    async def Propose(self, request, context):
        if not 0 <= request.k <= MAX_PROPOSALS:
            raise InvalidRequestError(f"k must be in [0, {MAX_PROPOSALS}], got {request.k}")
        if len(request.token_ids) > MAX_CONTEXT_TOKENS:
            raise InvalidRequestError(f"at most {MAX_CONTEXT_TOKENS} context tokens, got {len(request.token_ids)}")
        proposer = self._proposer(request.method, request.options_json)
        tokens = proposer.propose(list(request.token_ids), request.k)
        self.counters["requests"] += 1
        self.counters["proposed_tokens"] += len(tokens)
        return draft_pb2.ProposeResponse(token_ids=tokens)

    @rpc
    async def Stats(self, request, context):
        return common_pb2.ServiceStats(service="draft", values=with_rpc_counts(self, self.counters))


def registration(plugins=None) -> Registration:
    return Registration(DraftServicer(plugins), draft_pb2_grpc.add_DraftServicer_to_server,
                        draft_pb2.DESCRIPTOR.services_by_name["Draft"].full_name)
