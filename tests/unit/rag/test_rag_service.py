"""The retrieval service over gRPC and the `tandem rag` commands, on the real MiniLM embedder."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.cli import main
from tandem.services.common import ServerOptions, ServiceHost, client_channel
from tandem.services.retrieval import registration
from tandem.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

DOCS = [("paris", "Paris", "Paris is the capital of France, home of the Eiffel Tower and the Louvre museum."),
        ("python", "Python", "Python is a programming language created by Guido van Rossum in 1991."),
        ("everest", "Everest", "Mount Everest, at 8,849 metres, is the highest mountain above sea level.")]


@pytest.fixture()
def service(tmp_path, onnx_cache, embedder):  # embedder: the export is done once, before the service loads it
    host = ServiceHost([registration(str(tmp_path / "store"), True, str(onnx_cache))], ServerOptions()).start()
    yield host
    host.stop()


def test_ingest_retrieve_delete_over_grpc(service):
    async def body():
        stub = retrieval_pb2_grpc.RetrievalStub(client_channel(service.address))
        answer = await stub.Ingest(iter([retrieval_pb2.Document(id=i, title=t, text=x) for i, t, x in DOCS]))
        assert (answer.documents, answer.chunks) == (3, 3)
        found = await stub.Retrieve(retrieval_pb2.RetrieveRequest(query="Who created Python?", k=2))
        assert [c.document_id for c in found.chunks][0] == "python" and len(found.chunks) == 2
        assert found.chunks[0].text.startswith("Python is")
        vector_only = await stub.Retrieve(retrieval_pb2.RetrieveRequest(query="highest mountain", hybrid=False))
        assert vector_only.chunks[0].document_id == "everest" and len(vector_only.chunks) == 3
        assert (await stub.Delete(retrieval_pb2.DeleteRequest(document_ids=["python"]))).deleted == 1
        found = await stub.Retrieve(retrieval_pb2.RetrieveRequest(query="Who created Python?", k=3))
        assert "python" not in [c.document_id for c in found.chunks]
        stats = (await stub.Stats(common_pb2.StatsRequest())).values
        assert stats["documents"] == 2 and stats["chunks"] == 2
        for bad, message in ((retrieval_pb2.RetrieveRequest(query="x", k=101), "k"),
                             (retrieval_pb2.RetrieveRequest(query="x", collection="nope"), "nope")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Retrieve(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ingest(iter([retrieval_pb2.Document(id="empty", text="   ")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(client_channel(service.address))
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(body())


def test_rag_cli(tmp_path, onnx_cache, embedder, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": i, "title": t, "text": x}) for i, t, x in DOCS))
    common = ["--data-dir", str(tmp_path / "store"), "--onnx-cache-dir", str(onnx_cache)]
    assert main(["rag", "ingest", str(docs), *common]) == 0
    assert "ingested 3 documents" in capsys.readouterr().out
    assert main(["rag", "query", "capital of France", "--k", "1", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)[0]["document_id"] == "paris"
    assert main(["rag", "rebuild", *common]) == 0
    assert "3 vectors" in capsys.readouterr().out
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"paragraphs": [{"id": i, "title": t, "text": x} for i, t, x in DOCS]}))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question": "What is the capital of France?", "paragraph_id": "paris", "is_impossible": False},
        {"question": "Who made Python?", "paragraph_id": "python", "is_impossible": False},
        {"question": "How tall is Everest?", "paragraph_id": "everest", "is_impossible": False},
        {"question": "Unanswerable?", "paragraph_id": "", "is_impossible": True}]))
    assert main(["rag", "eval", str(questions), "--corpus", str(corpus), "--k", "2", "--json",
                 "--onnx-cache-dir", str(onnx_cache)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 3 and result["recall@1"] == 1.0 and result["recall@2"] == 1.0
    assert main(["rag", "query", "x", "--k", "0", *common]) == 2  # bad input: one line, status 2
    assert "k must be" in capsys.readouterr().err


def test_the_gateway_answers_from_retrieved_chunks(tmp_path, onnx_cache, embedder, tiny_hf_dir, tiny_llm):
    """Generate with rag: the gateway retrieves, puts the sources (canonical order) before the
    question, the answer equals the library's on that prompt, the sources come back, and a second
    question over the same sources reuses their KV from the prefix cache."""
    import tandem
    from tandem.orchestration.local import InProcessPipeline
    from tandem.sdk import Client, InvalidArgumentError
    from tandem.services.config import PipelineConfig
    from tandem.rag.prompt import canonical, rag_prompt

    config = PipelineConfig(model=str(tiny_hf_dir), grpc_port=0, http_port=0, kv_cache_memory=16 << 20, mode="aggregated",
                            rag_data_dir=str(tmp_path / "rag"), onnx_cache_dir=str(onnx_cache))
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)
    with InProcessPipeline(config) as pipe, Client(pipe.address, timeout=60) as client:
        async def ingest():
            stub = retrieval_pb2_grpc.RetrievalStub(client_channel(pipe.address_of("retrieval-0")))
            await stub.Ingest(iter([retrieval_pb2.Document(id=i, title=t, text=x) for i, t, x in DOCS]))
        asyncio.run(ingest())
        question = "Who created the Python language?"
        answer = client.complete(question, rag={"k": 3}, **greedy)
        assert [s.document_id for s in answer.sources] == ["everest", "paris", "python"]  # canonical order
        prompt = rag_prompt(question, canonical(answer.sources)) + "\nAnswer:"
        want = tiny_llm.generate(prompt, tandem.SamplingParams(**greedy))[0]
        assert answer.token_ids == want.token_ids
        again = client.complete("What is the capital of France?", rag={"k": 3}, **greedy)
        assert again.usage.cached_tokens >= 16  # the sources' blocks came from the prefix cache
        chat = client.chat([{"role": "user", "content": question}], rag={"k": 1}, **greedy)
        assert [s.document_id for s in chat.sources] == ["python"] and len(chat.token_ids) == 8
        with pytest.raises(InvalidArgumentError, match="text prompt"):
            client.complete([1, 2, 3], rag=True, max_tokens=2)
        with pytest.raises(InvalidArgumentError, match="k must be"):
            client.complete(question, rag={"k": 500}, max_tokens=2)


def test_acknowledged_documents_survive_kill_9_of_the_service(tmp_path, onnx_cache, embedder):
    import os
    import signal
    import subprocess
    import sys

    from tandem.orchestration.topology import free_port

    def start():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "service", "retrieval", "--port", str(port),
                                 "--rag-data-dir", str(tmp_path / "rag"), "--onnx-cache-dir", str(onnx_cache)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "listening" in line:
                return proc, f"127.0.0.1:{port}"
        raise AssertionError("the retrieval service did not start")

    proc, address = start()
    with grpc.insecure_channel(address) as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        for i in range(8):  # each acknowledged on its own
            stub.Ingest(iter([retrieval_pb2.Document(id=f"doc{i}", text=f"Document number {i} is about topic {i}.")]),
                        timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc, address = start()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            found = stub.Retrieve(retrieval_pb2.RetrieveRequest(query="topic 5", k=8), timeout=60)
            assert sorted(c.document_id for c in found.chunks) == [f"doc{i}" for i in range(8)]
            assert stub.Stats(common_pb2.StatsRequest(), timeout=10).values["documents"] == 8
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
