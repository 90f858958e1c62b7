"""The tokenizer service: tandem.Tokenizer (byte-level BPE, chat template) behind gRPC."""
from __future__ import annotations

from tandem.errors import InvalidRequestError
from tandem.tokenizer import Tokenizer
from tandem.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from .common import Registration, rpc
from .metrics import with_rpc_counts

MAX_TEXT_BYTES = 4 << 20  # a prompt is limited in tokens by the engine; this bounds the work before that


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer, model: str):
        self.tokenizer, self.model = tokenizer, model

    @rpc
    async def Tokenize(self, request, context):
        _check_size(request.text)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self.tokenizer.encode(request.text, add_bos=None if add else False, parse_special=request.parse_special)
        return common_pb2.TokenizeResponse(token_ids=ids)

    @rpc
    async def Detokenize(self, request, context):
        ids = list(request.token_ids)
        self.tokenizer.check_ids(ids)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return common_pb2.DetokenizeResponse(text=self.tokenizer.decode(ids, skip))

    @rpc
    async def ApplyChatTemplate(self, request, context):
        if not request.messages:
            raise InvalidRequestError("messages is empty")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        for m in messages:
            if not m["role"]:
                raise InvalidRequestError("every message needs a role")
            _check_size(m["content"])
        # control-token text inside a message stays text: only the template's markers are special
        return common_pb2.TokenizeResponse(token_ids=self.tokenizer.encode_chat(messages, add_generation_prompt=True))

    @rpc
    async def Info(self, request, context):
        t = self.tokenizer
        return tokenizer_pb2.TokenizerInfo(
            model=self.model, vocab_size=t.vocab_size,
            bos_token_id=-1 if t.bos_id is None else t.bos_id, eos_token_id=-1 if t.eos_id is None else t.eos_id,
            has_chat_template=bool(t.chat_template))


    @rpc
    async def Stats(self, request, context):
        return common_pb2.ServiceStats(service="tokenizer", values=with_rpc_counts(self, {}))


def _check_size(text: str) -> None:
    if len(text) > MAX_TEXT_BYTES:
        raise InvalidRequestError(f"the text has {len(text)} characters; the limit is {MAX_TEXT_BYTES}")


def registration(tokenizer: Tokenizer, model: str) -> Registration:
    return Registration(TokenizerServicer(tokenizer, model), tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
                        tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name)
