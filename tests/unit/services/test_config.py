"""PipelineConfig from YAML and flags (flags win), its checks, and the topology it plans."""
from __future__ import annotations

import pytest

from tandem.cli import build_parser, _pipeline_config
from tandem.errors import ConfigError
from tandem.orchestration.topology import peers, plan
from tandem.services.config import PipelineConfig


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "tandem.yaml"
    path.write_text("model: some.gguf\nquantization: int8\nreplicas: {decode: 2}\ngrpc_port: 6000\n"
                    "engine: {block_size: 32}\n")
    args = build_parser().parse_args(["serve", "--config", str(path), "--grpc-port", "7000",
                                      "--replicas", "prefill=3", "--quantization-option", "group_size=64"])
    config = _pipeline_config(args)
    assert config.model == "some.gguf" and config.quantization == "int8"
    assert config.grpc_port == 7000  # the flag wins
    assert config.replicas == {"prefill": 3, "decode": 1}  # the flag's map replaces the file's
    assert config.quantization_options == {"group_size": 64}
    assert config.llm_kwargs()["block_size"] == 32


@pytest.mark.parametrize("values, message", [
    ({"mode": "both"}, "mode must be one of"),
    ({"replicas": {"router": 1}}, "unknown role"),
    ({"replicas": {"decode": 0}}, "positive integer"),
    ({"grpc_port": 70000}, "port number"),
    ({"engine": {"blok_size": 8}}, "unknown keys"),
    ({"tls_cert": "cert.pem"}, "both tls_cert and tls_key"),
    ({"max_inflight": 0}, "positive integer"),
    ({"drain_grace_s": -1}, "drain_grace_s must be"),
    ({"drain_grace_s": "30"}, "drain_grace_s must be"),
])
def test_bad_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(**values)


def test_unknown_keys_and_unreadable_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="unknown settings \\['modle'\\]"):
        PipelineConfig.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        PipelineConfig.load(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        PipelineConfig.load(path)


def test_api_keys_from_every_source(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("k2\n\nk3\n")
    monkeypatch.setenv("TANDEM_API_KEYS", "k4, k5")
    assert PipelineConfig(api_keys=["k1"], api_key_file=str(keys)).resolved_api_keys() == ["k1", "k2", "k3", "k4", "k5"]


def test_topology_of_both_modes():
    disagg = plan(PipelineConfig(mode="disaggregated", replicas={"prefill": 2, "decode": 3}, grpc_port=0))
    names = [i.name for i in disagg]
    assert names[-1] == "gateway-0" and names.count("gateway-0") == 1
    assert sum(n.startswith("prefill") for n in names) == 2 and sum(n.startswith("decode") for n in names) == 3
    assert len({i.port for i in disagg}) == len(disagg)  # every service its own port
    links = peers(PipelineConfig(mode="disaggregated"), disagg)
    assert len(links["prefill"]) == 2 and len(links["decode"]) == 3
    agg = plan(PipelineConfig(mode="aggregated", replicas={"decode": 2}))
    assert [i.service for i in agg].count("worker") == 2 and not any(i.service == "prefill" for i in agg)
    assert len(peers(PipelineConfig(mode="aggregated"), agg)["decode"]) == 2


def test_mode_auto_fits_the_machine(monkeypatch):
    """auto: aggregated on a small CPU-only machine (one engine keeps every core), disaggregated
    on a big one or a Ray cluster; threads per worker never oversubscribe the local cores."""
    import tandem.services.config as config_module

    monkeypatch.setattr(config_module, "_has_gpu", lambda: False)
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 2)
    small = PipelineConfig()
    assert small.mode == "aggregated" and "2 CPU cores" in small.mode_reason() and small.worker_threads() == 2
    assert PipelineConfig(mode="disaggregated").worker_threads() == 1  # 2 cores, 2 workers
    assert PipelineConfig(mode="disaggregated", num_threads=2).worker_threads() == 2  # the operator's choice
    assert PipelineConfig(ray_address="ray://head:10001").mode == "disaggregated"
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 16)
    big = PipelineConfig(replicas={"prefill": 1, "decode": 3})
    assert big.mode == "disaggregated" and big.worker_threads() == 4
    assert PipelineConfig(mode="aggregated").mode_reason() == "set in the configuration"


def test_cluster_wiring_uses_advertised_addresses_and_starts_in_dependency_order():
    from tandem.orchestration.ray_launcher import actor_options
    from tandem.orchestration.topology import stages

    config = PipelineConfig(service_host="0.0.0.0", gateway_resources={"tandem_gateway": 1}, grpc_port=0,
                            mode="disaggregated")
    instances = plan(config)
    first, workers, gateway = stages(instances)
    assert {i.service for i in first} == {"kvstore", "tokenizer", "draft", "retrieval"}
    assert {i.service for i in workers} == {"prefill", "decode"} and [i.service for i in gateway] == ["gateway"]
    kvstore = next(i for i in instances if i.service == "kvstore")
    links = peers(config, instances, {kvstore.name: f"10.0.0.7:{kvstore.port}"})
    assert links["kvstore"] == f"10.0.0.7:{kvstore.port}"  # what the started actor reported
    assert links["tokenizer"].startswith("0.0.0.0:")  # not started yet: the plan's address
    assert actor_options(config, gateway[0], gpus=False)["resources"] == {"tandem_gateway": 1}
    assert "resources" not in actor_options(config, workers[0], gpus=False)
    with pytest.raises(ConfigError, match="gateway_resources"):
        PipelineConfig(gateway_resources={"tandem_gateway": -1})
    assert PipelineConfig(device="cuda:1").device == "cuda:1"  # checked here, resolved on each worker
    with pytest.raises(ConfigError, match="device"):
        PipelineConfig(device="gpu")


def test_kv_namespace_changes_with_what_changes_the_kv(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    base = PipelineConfig().kv_namespace(model, 16)
    assert base == PipelineConfig().kv_namespace(model, 16)
    assert base != PipelineConfig(quantization="int8").kv_namespace(model, 16)
    assert base != PipelineConfig(kv_cache_dtype="int8").kv_namespace(model, 16)
    assert base != PipelineConfig().kv_namespace(model, 32)
    assert base != PipelineConfig(dtype="bfloat16").kv_namespace(model, 16)


def test_request_limits_and_plugins_settings(tmp_path):
    path = tmp_path / "tandem.yaml"
    path.write_text("speculative: {method: ngram, k: 4, options: {min_n: 2}}\nspeculative_methods: [ngram]\n"
                    "plugins: [example]\nhttp_request_timeout_s: 30\n")
    config = PipelineConfig.load(path)
    kwargs = config.llm_kwargs()
    assert kwargs["speculative_methods"] == ["ngram"] and kwargs["plugins"] == ["example"]
    assert config.http_request_timeout_s == 30
    for bad in ({"speculative_methods": "ngram"}, {"plugins": "example"}, {"http_request_timeout_s": 0},
                {"http_request_timeout_s": True}):
        with pytest.raises(ConfigError):
            PipelineConfig(**bad)


def test_every_service_drains_for_the_configured_grace(tiny_hf_dir):
    from tandem.services import build

    config = PipelineConfig(model=str(tiny_hf_dir), drain_grace_s=42.0, http_port=0)
    assert build("kvstore", config).options.grace_s == 42.0
    gateway = build("gateway", config, peers={"tokenizer": "127.0.0.1:1", "decode": ["127.0.0.1:2"]})
    assert gateway.options.grace_s == 42.0 and gateway.http.options.grace_s == 42.0
