"""The KV-cache store: KVBlockStore on its own (LRU order, capacity counting metadata, pins as
leases, rejections, longest prefix, namespaces, validation, bit-exact tensor bytes), then the gRPC
service over a loopback server (chunked round trips of mixed-dtype blocks, Lookup, eviction in
Stats, malformed Put streams, health, sealed keys and digests: forged and corrupted blocks are
never imported)."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.engine.block_manager import block_hash
from tandem.errors import InvalidRequestError
from tandem.kv_store import (EXISTING, REJECTED, STORED, BlockSeal, KVBlockStore, entry_bytes, specs_nbytes, tensor_from_bytes,
                             tensor_to_bytes, tensors_from_bytes, tensors_to_bytes)
from tandem.services.common import ServerOptions, ServiceHost, client_channel
from tandem.engine.kv_connector import KVStoreClient
from tandem.kv_store import ChunkAssembler, to_chunks
from tandem.services.kvstore import SERVICE_NAME, registration
from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc

NS = "model-a"
SPECS = [("uint8", (100,))]  # a 100-byte block


def chain(n: int, start: int = 0) -> list[bytes]:
    """n hashes of consecutive 4-token blocks, chained the way the engine chains them."""
    hashes, parent = [], None
    for i in range(start, start + n):
        parent = block_hash(parent, [i, i + 1, i + 2, i + 3])
        hashes.append(parent)
    return hashes


COST = entry_bytes(NS, chain(1)[0], SPECS, 100)  # what a 100-byte block takes of the capacity


def fill(store: KVBlockStore, hashes: list[bytes], ns: str = NS) -> list[str]:
    return [store.put(ns, h, SPECS, bytes([i]) * 100)[0] for i, h in enumerate(hashes)]


def present(store: KVBlockStore, hashes: list[bytes]) -> list[bool]:
    return [store.lookup(NS, [h]) == 1 for h in hashes]


# -- KVBlockStore --------------------------------------------------------------------------------
def test_lru_evicts_least_recently_used_and_counts():
    store, h = KVBlockStore(3 * COST), chain(4)
    assert fill(store, h[:3]) == [STORED] * 3
    assert store.lookup(NS, [h[0]]) == 1  # h[0] is now the most recent; h[1] goes first
    assert store.put(NS, h[3], SPECS, b"\x07" * 100) == (STORED, 1)
    assert present(store, h) == [True, False, True, True]
    assert store.put(NS, h[2], SPECS, b"\x02" * 100) == (EXISTING, 0)
    s = store.stats()
    assert (s["blocks"], s["bytes_used"], s["data_bytes"], s["evictions"], s["puts"]) == (3, 3 * COST, 300, 1, 5)
    assert store.get(NS, h[2])[:2] == (SPECS, b"\x02" * 100)


def test_a_block_put_again_with_other_contents_replaces_it():
    """A worker that found a forged or corrupted block publishes its own copy: it must replace the
    bad one, also when the bad one kept the genuine digest (a corrupted block)."""
    store, h = KVBlockStore(3 * COST), chain(2)
    assert store.put(NS, h[0], SPECS, bytes(100), b"d" * 32) == (STORED, 0)
    assert store.put(NS, h[0], SPECS, b"\x01" * 100, b"d" * 32) == (STORED, 0)  # same digest, other bytes
    assert store.get(NS, h[0]) == (SPECS, b"\x01" * 100, b"d" * 32)
    assert store.put(NS, h[0], SPECS, b"\x01" * 100, b"e" * 32) == (STORED, 0)  # another digest
    assert store.get(NS, h[0]).digest == b"e" * 32
    assert store.put(NS, h[0], SPECS, b"\x01" * 100, b"e" * 32) == (EXISTING, 0)
    assert store.pin(NS, [h[0]]) == 1
    assert store.put(NS, h[0], SPECS, b"\x02" * 100, b"e" * 32) == (STORED, 0)  # a pinned one keeps its pin
    s = store.stats()
    assert (s["blocks"], s["replaced"], s["pinned_blocks"], s["bytes_used"]) == (1, 3, 1, COST + 32)  # the 32-byte digest


def test_metadata_counts_against_the_capacity():
    """Blocks of no data still cost their keys, digests and specs: a store cannot be filled without
    bound with empty blocks (before, a 10 KB store took all 1,000 of them)."""
    store, h = KVBlockStore(10_000), chain(1000)
    outcomes = [store.put(NS, x, [("uint8", (0,))], b"", bytes(32))[0] for x in h]
    s = store.stats()
    assert s["blocks"] == 10_000 // entry_bytes(NS, h[0], [("uint8", (0,))], 0, bytes(32)) < 1000
    assert s["bytes_used"] <= 10_000 and s["data_bytes"] == 0 and outcomes.count(STORED) == 1000
    assert s["evictions"] == 1000 - s["blocks"]
    # what entry_bytes counts is close to what Python spends (measured: ~500 bytes for this shape)
    big = entry_bytes("model-abcdef0123456789", bytes(32), [("bfloat16", (2, 16, 4, 64)), ("float32", (16, 4, 1))],
                      0, bytes(32))
    assert 450 <= big <= 550


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pins_are_leases_that_expire():
    clock = Clock()
    store, h = KVBlockStore(2 * COST, pin_lease_s=10, clock=clock), chain(3)
    fill(store, h[:2])
    assert store.pin(NS, [h[0]]) == 1 and store.pin(NS, [h[0]], lease_s=30) == 1
    assert store.pin(NS, [h[1]], lease_s=10_000) == 1  # capped at MAX_PIN_LEASE_S (600)
    assert store.put(NS, h[2], SPECS, bytes(100)) == (REJECTED, 0)  # everything is pinned
    clock.now += 10.5  # h[0]'s first lease is over, its second is not
    assert store.stats()["pinned_blocks"] == 2 and store.stats()["expired_pins"] == 1
    assert store.put(NS, h[2], SPECS, bytes(100)) == (REJECTED, 0)
    clock.now += 20  # h[0]'s second lease is over too: it is evictable again
    assert store.put(NS, h[2], SPECS, bytes(100)) == (STORED, 1)
    assert present(store, h) == [False, True, True]
    clock.now += 600  # h[1]'s capped lease
    s = store.stats()
    assert (s["pinned_blocks"], s["expired_pins"]) == (0, 3)
    assert store.unpin(NS, [h[1]]) == 1  # present, no pin left to release: nothing breaks


def test_unpin_releases_the_lease_that_ends_first():
    clock = Clock()
    store, h = KVBlockStore(2 * COST, clock=clock), chain(1)
    fill(store, h)
    store.pin(NS, h, lease_s=5)
    store.pin(NS, h, lease_s=50)
    assert store.unpin(NS, h) == 1
    clock.now += 10  # the 5 s lease was the one released: the 50 s one holds
    assert store.stats()["pinned_blocks"] == 1 and store.stats()["expired_pins"] == 0
    clock.now += 50
    assert store.stats()["pinned_blocks"] == 0 and store.stats()["expired_pins"] == 1


def test_bigger_block_evicts_several():
    store, h = KVBlockStore(3 * COST), chain(4)
    fill(store, h[:3])
    assert store.put(NS, h[3], [("float32", (50,))], bytes(200)) == (STORED, 2)
    assert present(store, h) == [False, False, True, True]
    assert store.stats()["bytes_used"] == 2 * COST + 100  # one 100-byte block, one 200-byte


def test_pins_block_eviction_and_count():
    store, h = KVBlockStore(2 * COST), chain(4)
    fill(store, h[:2])
    assert store.pin(NS, [h[0], h[0], h[1], h[3]]) == 3  # h[3] is absent
    assert store.stats()["pinned_blocks"] == 2
    assert store.put(NS, h[2], SPECS, bytes(100)) == (REJECTED, 0)  # everything left is pinned
    assert store.unpin(NS, [h[1]]) == 1
    assert store.put(NS, h[2], SPECS, bytes(100)) == (STORED, 1)
    assert present(store, h[:3]) == [True, False, True]
    assert store.unpin(NS, [h[0]]) == 1  # h[0] was pinned twice: still pinned
    assert store.stats()["pinned_blocks"] == 1
    assert store.put(NS, h[3], SPECS, bytes(100)) == (STORED, 1)
    assert present(store, h) == [True, False, False, True]
    assert store.unpin(NS, [h[0]]) == 1 and store.stats()["pinned_blocks"] == 0
    assert store.put(NS, h[1], SPECS, bytes(100)) == (STORED, 1)
    assert present(store, h) == [True, True, False, False]  # unpinned h[0] came back as the most recent
    assert store.put(NS, h[2], SPECS, bytes(100)) == (STORED, 1)
    assert present(store, h) == [False, True, True, False]  # and is evictable again
    assert store.stats()["rejected"] == 1


def test_block_larger_than_capacity_is_rejected_without_evicting():
    store, h = KVBlockStore(COST + 50), chain(2)
    fill(store, h[:1])
    assert store.put(NS, h[1], [("uint8", (151,))], bytes(151)) == (REJECTED, 0)
    assert present(store, h) == [True, False]
    assert store.reject_oversized(COST + 51) and not store.reject_oversized(COST + 50)
    s = store.stats()
    assert (s["rejected"], s["evictions"], s["blocks"]) == (2, 0, 1)


def test_lookup_is_the_longest_prefix_and_stops_at_the_first_miss():
    store, h = KVBlockStore(10 * COST), chain(5)
    fill(store, [h[0], h[1], h[3], h[4]])
    assert store.lookup(NS, h) == 2
    assert store.lookup(NS, h[3:]) == 2
    assert store.lookup(NS, []) == 0
    assert store.lookup(NS, [h[2], h[0]]) == 0
    s = store.stats()
    assert (s["hits"], s["misses"]) == (4, 2)


def test_namespaces_are_isolated():
    store, h = KVBlockStore(10 * COST), chain(1)
    fill(store, h, ns="a")
    assert store.lookup("b", h) == 0 and store.get("b", h[0]) is None
    assert store.pin("b", h) == 0
    assert store.put("b", h[0], SPECS, b"\x09" * 100) == (STORED, 0)
    assert store.get("a", h[0])[1] == bytes(100) and store.get("b", h[0])[1] == b"\x09" * 100


@pytest.mark.parametrize("specs, num_bytes, message", [
    ([("float32", (2, 3))], 23, "take 24"),
    ([("float32", (2, 3)), ("int8", (4,))], 24, "take 28"),
    ([("float64", (2,))], 16, "float64"),
    ([("complex64", (1,))], 8, "complex64"),
    ([("int8", (-1, 2))], 0, "negative"),
])
def test_put_validates_specs_against_data(specs, num_bytes, message):
    store = KVBlockStore(10 * COST)
    with pytest.raises(InvalidRequestError, match=message):
        store.put(NS, b"h", specs, bytes(num_bytes))
    with pytest.raises(InvalidRequestError, match="hash"):
        store.put(NS, b"", SPECS, bytes(100))
    assert store.stats()["blocks"] == 0 and store.stats()["puts"] == 0


def test_specs_nbytes():
    assert specs_nbytes([("bfloat16", (2, 4, 8)), ("float8_e4m3fn", (3,)), ("int32", ())]) == 128 + 3 + 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                                   torch.int32, torch.float8_e4m3fn])
def test_tensor_bytes_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, 7, generator=g) * 50).to(dtype)[:, 1:4]  # a non-contiguous view
    spec, data = tensor_to_bytes(t)
    assert spec == (str(dtype).removeprefix("torch."), (3, 3, 7)) and len(data) == t.numel() * t.element_size()
    back = tensor_from_bytes(spec, data)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.contiguous().view(torch.uint8))


def test_tensors_bytes_round_trip_including_empty_and_scalar():
    tensors = [torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.empty(0, 4), torch.tensor(1.5)]
    specs, data = tensors_to_bytes(tensors)
    assert specs == [("int32", (2, 3)), ("float32", (0, 4)), ("float32", ())] and len(data) == 28
    back = tensors_from_bytes(specs, data)
    assert [b.shape for b in back] == [t.shape for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    with pytest.raises(InvalidRequestError):
        tensors_from_bytes(specs, data[:-1])
    with pytest.raises(InvalidRequestError, match="float64"):
        tensor_to_bytes(torch.zeros(2, dtype=torch.float64))


def test_chunk_assembler_reassembles_and_refuses_malformed_streams():
    data = bytes(range(250))
    chunks = list(to_chunks(NS, b"h", [("uint8", (250,))], data, 100))
    assert [c.offset for c in chunks] == [0, 100, 200]
    a = ChunkAssembler()
    assert [a.feed(c) for c in chunks[:2]] == [None, None]
    assert a.feed(chunks[2]).data == data
    a.close()
    for bad, message in [([chunks[0], chunks[2]], "expected 100"), ([chunks[1]], "no block"),
                         ([chunks[0], chunks[1], chunks[1]], "expected 200"),
                         ([chunks[0], chunks[0]], "ended after 100 of 250")]:
        with pytest.raises(InvalidRequestError, match=message):
            a = ChunkAssembler()
            for c in bad:
                a.feed(c)
    a = ChunkAssembler()
    a.feed(chunks[0])
    with pytest.raises(InvalidRequestError, match="ended after 100"):
        a.close()


# -- the service ---------------------------------------------------------------------------------
CHUNK = 64 << 10


def mixed_block(seed: int) -> list[torch.Tensor]:
    """~200 KB: K in bfloat16, V in float32, an int8 copy and its float32 scales."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 16, 4, 512, generator=g).to(torch.bfloat16)  # (layers, tokens, heads, dim): 128 KB
    v = torch.randn(16, 4, 256, generator=g)  # 64 KB
    q = torch.randint(-128, 128, (16, 4, 128), generator=g, dtype=torch.int8)  # 8 KB
    scales = torch.rand(16, 4, 1, generator=g)
    return [k, v, q, scales]


# a mixed block's entry in the store: 205,056 bytes of data, its specs, a 32-byte key and digest
MIXED_COST = entry_bytes(NS, bytes(32), tensors_to_bytes(mixed_block(0))[0], 205_056, bytes(32))


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@contextlib.contextmanager
def serve(capacity_bytes: int):
    host = ServiceHost([registration(KVBlockStore(capacity_bytes))], ServerOptions(port=0)).start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def host():
    with serve(3 * MIXED_COST + 1000) as h:  # room for 3 of the 4 mixed blocks
        yield h


def run(host: ServiceHost, body):
    async def main():
        async with client_channel(host.address) as channel:
            return await body(channel)
    return asyncio.run(main())


def test_round_trip_lookup_eviction_and_stats(host):
    hashes, blocks = chain(4), [mixed_block(i) for i in range(4)]
    assert sum(t.numel() * t.element_size() for t in blocks[0]) == 205_056 > 3 * CHUNK

    async def body(channel):
        client = KVStoreClient(channel, chunk_bytes=CHUNK)
        first = await client.put_blocks(NS, list(zip(hashes[:3], blocks[:3])))
        lookups = [await client.lookup(NS, hashes), await client.lookup("other", hashes)]
        got = await client.get_blocks(NS, [hashes[2], hashes[3], hashes[0]])
        pinned = await client.pin(NS, hashes[:1])
        again = await client.put_blocks(NS, [(hashes[0], blocks[0]), (hashes[3], blocks[3])])
        return first, lookups, got, pinned, again, await client.lookup(NS, hashes), await client.stats()

    first, lookups, got, pinned, again, after, stats = run(host, body)
    assert (first.stored, first.existing, first.rejected, first.evicted) == (3, 0, 0, 0)
    assert lookups == [3, 0]
    assert list(got) == [hashes[2], hashes[0]]  # request order, the missing one skipped
    for h, i in [(hashes[2], 2), (hashes[0], 0)]:
        assert all(bit_equal(a, b) for a, b in zip(got[h], blocks[i], strict=True))
    assert pinned == 1
    assert (again.stored, again.existing, again.rejected, again.evicted) == (1, 1, 0, 1)
    # LRU order was h1 (oldest), then h2 and h0 from the Get; h0 is pinned anyway: h1 goes.
    assert after == 1
    assert (stats["blocks"], stats["evictions"], stats["pinned_blocks"], stats["data_bytes"]) == (3, 1, 1, 3 * 205_056)
    assert stats["bytes_used"] == 3 * MIXED_COST and stats["capacity_bytes"] == 3 * MIXED_COST + 1000


def test_oversized_block_is_rejected_and_stream_goes_on(host):
    big = [torch.zeros(700_000, dtype=torch.uint8)]
    h = chain(2)

    async def body(channel):
        client = KVStoreClient(channel, chunk_bytes=CHUNK)
        response = await client.put_blocks(NS, [(h[0], big), (h[1], [torch.ones(10)])])
        return response, await client.lookup(NS, [h[1]]), await client.lookup(NS, [h[0]]), await client.stats()

    response, found_small, found_big, stats = run(host, body)
    assert (response.stored, response.rejected) == (1, 1)
    assert (found_small, found_big, stats["rejected"]) == (1, 0, 1)


def test_malformed_put_stream_is_invalid_argument(host):
    specs, data = tensors_to_bytes([torch.zeros(3 * CHUNK, dtype=torch.uint8)])
    chunks = list(to_chunks(NS, b"h", specs, data, CHUNK))

    async def put(channel, stream):
        try:
            await kvstore_pb2_grpc.KVStoreStub(channel).Put(iter(stream))
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    async def body(channel):
        gap = await put(channel, [chunks[0], chunks[2]])
        short = await put(channel, chunks[:2])
        bad_total = await put(channel, [kvstore_pb2.KVChunk(hash=b"h", namespace=NS, tensors=chunks[0].tensors,
                                                            total_bytes=5, data=b"12345")])
        bad_dtype = await put(channel, [kvstore_pb2.KVChunk(hash=b"h", tensors=[kvstore_pb2.TensorSpec(
            dtype="float64", shape=[1])], total_bytes=8, data=bytes(8))])
        return gap, short, bad_total, bad_dtype, await KVStoreClient(channel).stats()

    gap, short, bad_total, bad_dtype, stats = run(host, body)
    assert gap == (grpc.StatusCode.INVALID_ARGUMENT, f"block 68: chunk at offset {2 * CHUNK}, expected {CHUNK}")
    assert short[0] == grpc.StatusCode.INVALID_ARGUMENT and f"ended after {2 * CHUNK} of {3 * CHUNK}" in short[1]
    assert bad_total[0] == grpc.StatusCode.INVALID_ARGUMENT and "total_bytes 5" in bad_total[1]
    assert bad_dtype[0] == grpc.StatusCode.INVALID_ARGUMENT and "float64" in bad_dtype[1]
    assert stats["blocks"] == 0


def test_get_chunk_size_is_bounded():
    h = chain(1)
    block = [torch.arange(1_500_000, dtype=torch.int32)]  # 6 MB

    async def body(channel):
        client = KVStoreClient(channel)
        await client.put_blocks(NS, [(h[0], block)])
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        sizes = {}
        for asked in (1, 0, 8 << 20):  # the store knows the block by its sealed key
            call = stub.Get(kvstore_pb2.GetRequest(namespace=NS, hashes=[client.seal.key(h[0])], chunk_bytes=asked))
            sizes[asked] = [len(c.data) async for c in call]
        return sizes

    with serve(8 << 20) as host:
        sizes = run(host, body)
    assert sizes[1] == [CHUNK] * 91 + [6_000_000 - 91 * CHUNK]
    assert sizes[0] == [1 << 20] * 5 + [6_000_000 - 5 * (1 << 20)]
    assert sizes[8 << 20] == [4 << 20, 6_000_000 - (4 << 20)]


def test_health_says_serving(host):
    async def body(channel):
        stub = health_pb2_grpc.HealthStub(channel)
        return [(await stub.Check(health_pb2.HealthCheckRequest(service=name))).status for name in ("", SERVICE_NAME)]

    assert run(host, body) == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_pin_lease_over_the_wire():
    clock = Clock()
    host = ServiceHost([registration(KVBlockStore(1 << 20, clock=clock))], ServerOptions(port=0)).start()
    h = chain(2)

    async def body(channel):
        client = KVStoreClient(channel)
        await client.put_blocks(NS, [(x, [torch.ones(4)]) for x in h])
        pinned = [await client.pin(NS, h[:1], lease_s=5), await client.pin(NS, h[1:])]  # 5 s, the default 30 s
        clock.now += 6
        after_5 = (await client.stats())["pinned_blocks"]
        clock.now += 30
        expired = await client.stats()
        # the hand-off: a Put that pins what it sends, a Get that releases what it returns
        put = await client.put_blocks(NS, [(h[0], [torch.ones(4)])], pin=h + [b"\x09" * 16], lease_s=60)
        held = (await client.stats())["pinned_blocks"]
        await client.get_blocks(NS, h, release=True)
        return pinned, after_5, expired, put, held, await client.stats()

    try:
        pinned, after_5, stats, put, held, released = run(host, body)
    finally:
        host.stop()
    assert pinned == [1, 1] and after_5 == 1
    assert (stats["pinned_blocks"], stats["expired_pins"]) == (0, 2)
    assert held == 2 and len(put.missing) == 1  # the absent key is reported (as its sealed key)
    assert released["pinned_blocks"] == 0 and released["expired_pins"] == 2


def test_the_client_seals_keys_and_drops_blocks_that_fail_their_digest():
    """The store sees sealed keys only; a block whose bytes or digest were changed in the store, or
    put by a client with another secret, is dropped and counted, never returned."""
    store = KVBlockStore(1 << 20)
    host = ServiceHost([registration(store)], ServerOptions(port=0)).start()
    h, blocks = chain(3), [[torch.full((8,), float(i))] for i in range(3)]

    async def body(channel):
        ours, theirs = KVStoreClient(channel, seal=BlockSeal("a" * 32)), KVStoreClient(channel, seal=BlockSeal("b" * 32))
        await ours.put_blocks(NS, list(zip(h, blocks)))
        keys = {key for _, key in store.lru}
        seen_by_others = await theirs.lookup(NS, h)  # another deployment's keys do not name our blocks
        await theirs.put_blocks(NS, [(h[2], [torch.zeros(8)])])  # lands under its own key
        (ns, key), victim = next((k, b) for k, b in store.lru.items() if k[1] == ours.seal.key(h[1]))
        victim.data = bytes(len(victim.data))  # corrupted in the store, digest untouched
        got = await ours.get_blocks(NS, h)
        return keys, seen_by_others, got, ours.num_rejected, theirs

    try:
        keys, seen_by_others, got, rejected, theirs = run(host, body)
    finally:
        host.stop()
    assert not keys & set(h) and len(keys) == 3  # no bare block hash reaches the store
    assert seen_by_others == 0
    assert list(got) == [h[0], h[2]] and rejected == 1
    assert torch.equal(got[h[2]][0], blocks[2][0])


def test_a_forged_digest_is_dropped():
    store = KVBlockStore(1 << 20)
    host = ServiceHost([registration(store)], ServerOptions(port=0)).start()
    h = chain(1)
    seal, attacker = BlockSeal("a" * 32), BlockSeal("x" * 32)
    specs, data = tensors_to_bytes([torch.full((8,), 7.0)])

    async def body(channel):
        forged = to_chunks(NS, seal.key(h[0]), specs, data, CHUNK, attacker.digest(NS, h[0], specs, data))
        await kvstore_pb2_grpc.KVStoreStub(channel).Put(iter(list(forged)))
        client = KVStoreClient(channel, seal=seal)
        return await client.get_blocks(NS, h), client.num_rejected

    try:
        got, rejected = run(host, body)
    finally:
        host.stop()
    assert got == {} and rejected == 1


@pytest.mark.parametrize("lease", [float("nan"), float("inf"), -1.0, 0.0])
def test_a_lease_that_is_not_a_positive_number_gets_the_default(lease):
    """A NaN lease once pinned a block for ever (no expiry time ever came due)."""
    from tandem.kv_store import tensors_to_bytes

    clock = Clock()
    store = KVBlockStore(1 << 20, pin_lease_s=5, clock=clock)
    h = chain(1)
    store.put(NS, h[0], *tensors_to_bytes([torch.ones(4)]))
    assert store.pin(NS, h, lease_s=lease) == 1
    clock.now += 6
    assert store.stats()["pinned_blocks"] == 0


def test_a_put_that_pins_too_many_keys_is_refused(host):
    from tandem.services.kvstore import MAX_PIN_KEYS

    async def body(channel):
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        keys = [i.to_bytes(16, "big") for i in range(MAX_PIN_KEYS + 1)]
        half = len(keys) // 2
        messages = [kvstore_pb2.KVChunk(namespace=NS, pin=keys[:half]), kvstore_pb2.KVChunk(namespace=NS, pin=keys[half:])]

        async def stream():
            for m in messages:
                yield m
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Put(stream())
        return refused.value

    error = run(host, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in error.details()
