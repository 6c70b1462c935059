"""The triton MoE backend (TRITON_INTERPRET=1 on the CPU) against the torch backend and against Transformers."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported: it decides how @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from dots1_reference import build_reference, reference_generate  # noqa: E402
from paged_runner import PagedRunner  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.expert_loading import ExpertWeightLoader  # noqa: E402
from model.moe import Dots1MoE  # noqa: E402
from model.moe_backend import TorchMoEBackend, TritonMoEBackend  # noqa: E402
from model.parallel import ParallelState  # noqa: E402
from model.routed_experts import RoutedExperts  # noqa: E402
from model.weights import CheckpointTensor  # noqa: E402
from scheduler.config import EngineConfig  # noqa: E402
from scheduler.model_runner import ModelExecutor  # noqa: E402
from server.cli import engine_config, parse_args  # noqa: E402

DECODE_STEPS = 6
BACKENDS = {"torch": TorchMoEBackend(), "triton": TritonMoEBackend()}


def moe_config(**overrides) -> ModelConfig:
    fields = dict(model_type="dots1", vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16,
                  num_hidden_layers=1, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                  moe_intermediate_size=16, n_group=4, topk_group=2, first_k_dense_replace=0, norm_topk_prob=True,
                  routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return ModelConfig.from_dict(fields | overrides)


def random_expert_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (gate_proj, up_proj, down_proj) of one layer's routed experts."""
    generator = torch.Generator().manual_seed(seed)
    inter, hidden = config.moe_intermediate_size, config.hidden_size
    tensors = {}
    for expert in range(config.n_routed_experts):
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            tensors[f"experts.{expert}.{name}.weight"] = 0.3 * torch.randn(shape, generator=generator)
    return tensors


def loaded_experts(config: ModelConfig, parallel: ParallelState, tensors: dict[str, torch.Tensor]) -> RoutedExperts:
    experts = RoutedExperts(config, parallel, torch.float32)
    for key, target in ExpertWeightLoader(experts).weight_targets("experts").items():
        if key in tensors and target.load is not None:
            target.load(CheckpointTensor.from_tensor(key, tensors[key]))
    return experts


def route(config: ModelConfig, num_tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator)
    moe = Dots1MoE(config, ParallelState(), torch.float32)
    moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=generator))
    moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts, generator=generator))
    weights, expert_ids = moe.gate(x)
    return x, weights, expert_ids


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor_parallel", "expert_parallel"])
def test_sharded_experts_sum_to_the_unsharded_result(expert_parallel):
    """Two ranks' shards, built and run in one process; the all-reduce is their sum."""
    config = moe_config()
    tensors = random_expert_tensors(config)
    x, weights, expert_ids = route(config, num_tokens=10)
    full = loaded_experts(config, ParallelState(), tensors)
    expected = BACKENDS["torch"].compute(full, x, weights, expert_ids)
    total = torch.zeros_like(expected)
    for rank in range(2):
        shard = loaded_experts(config, ParallelState(rank=rank, world_size=2, expert_parallel=expert_parallel),
                               tensors)
        assert shard.w13.shape == ((8, 32, 32) if expert_parallel else (16, 16, 32))
        part = BACKENDS["triton"].compute(shard, x, weights, expert_ids)
        assert (part - expected).abs().max() > 1e-2  # one shard alone is not the answer
        total += part
    assert (total - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_group_limited_layer_matches_the_torch_backend(dtype):
    config = moe_config()
    torch.manual_seed(0)
    reference = Dots1MoE(config, ParallelState(), dtype, count_experts=True, backend=BACKENDS["torch"])
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(0.3 * torch.randn(param.shape))
        reference.gate.weight.mul_(5.0)
    fused = Dots1MoE(config, ParallelState(), dtype, count_experts=True, backend=BACKENDS["triton"])
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(12, config.hidden_size).to(dtype)

    _, expert_ids = reference.gate(x)
    groups_used = [len(set(row)) for row in (expert_ids // 4).tolist()]
    assert max(groups_used) <= config.topk_group < config.n_group
    scores = (x.float() @ reference.gate.weight.T).sigmoid() + reference.gate.e_score_correction_bias
    unlimited = scores.topk(config.num_experts_per_tok, dim=-1).indices
    assert any(set(a) != set(b) for a, b in zip(unlimited.tolist(), expert_ids.tolist()))  # the limit matters here

    expected, actual = reference(x), fused(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item() < tolerance
    assert torch.equal(fused.expert_counts, reference.expert_counts) and fused.expert_counts.sum() == 12 * 4


class RecordedOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


# Ops that read device values back to the host or give data-dependent shapes (bincount syncs on CUDA).
SYNCING_OPS = {"aten.bincount.default", "aten.nonzero.default", "aten.index.Tensor", "aten.masked_select.default",
               "aten._local_scalar_dense.default", "aten.unique_dim.default", "aten._unique2.default"}


def test_triton_layer_reads_nothing_back_to_the_host(monkeypatch):
    config = moe_config()
    layers = {name: Dots1MoE(config, ParallelState(), torch.float32, count_experts=True, backend=backend)
              for name, backend in BACKENDS.items()}
    x = torch.randn(6, config.hidden_size)
    recorded = {}
    for backend, layer in layers.items():
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_()
        with RecordedOps() as recorder:
            layer(x)
        recorded[backend] = recorder.ops
    assert recorded["torch"] & SYNCING_OPS  # the recorder sees them where they are
    assert not recorded["triton"] & SYNCING_OPS

    def host_read(*args, **kwargs):
        raise AssertionError("a host read in the triton MoE forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with pytest.raises(AssertionError, match="host read"):
        layers["torch"](x)  # the torch backend's pair counts come to the host
    layers["triton"](x)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A dense first layer, then MoE layers with a shared expert and group-limited routing."""
    model_dir = tmp_path_factory.mktemp("moe_backend")
    reference = build_reference(model_dir, n_group=4, topk_group=2, num_experts_per_tok=3, n_routed_experts=12)
    prompts = [[5, 17, 3, 88, 41, 9, 60], [2, 95, 14, 14], list(range(20, 33))]
    return model_dir, prompts, [reference_generate(reference, prompt, DECODE_STEPS) for prompt in prompts]


def test_model_on_the_triton_backend_matches_transformers(checkpoint):
    model_dir, prompts, expected = checkpoint
    model = load_model(model_dir, dtype=torch.float32, device="cpu", moe_backend="triton", expert_metrics=True)
    assert all(model.layers[layer].mlp.backend.name == "triton" for layer in model.moe_layer_ids)
    assert model.moe_backend.name == "triton" and model.moe_backend.graph_safe
    runner = PagedRunner(model, seed=4)
    logits = runner.step(dict(enumerate(prompts)), all_logits=True)
    for seq, (actual, (prompt_logits, _, _)) in enumerate(zip(logits, expected)):
        assert (actual - prompt_logits).abs().max().item() < 1e-4, f"sequence {seq} prompt logits"
    tokens = {seq: int(seq_logits[-1].argmax()) for seq, seq_logits in enumerate(logits)}
    generated = {seq: [token] for seq, token in tokens.items()}
    for step in range(DECODE_STEPS - 1):
        decoded = runner.step({seq: [token] for seq, token in tokens.items()})
        for seq, step_logits in enumerate(decoded):
            assert (step_logits - expected[seq][2][step]).abs().max().item() < 1e-4, f"sequence {seq} step {step}"
            tokens[seq] = int(step_logits.argmax())
            generated[seq].append(tokens[seq])
    assert [generated[seq] for seq in range(len(prompts))] == [tokens for _, tokens, _ in expected]
    layer_ids, counts = model.take_expert_counts()
    assert layer_ids == [1, 2] and counts.sum(dim=1).tolist() == [3 * (24 + 3 * (DECODE_STEPS - 1))] * 2


def test_engine_config_reaches_the_model(checkpoint):
    model_dir, _, _ = checkpoint
    args = parse_args(["--moe-backend", "triton", "--model", str(model_dir)])
    assert engine_config(args).moe_backend == "triton"
    with pytest.raises(SystemExit):
        parse_args(["--moe-backend", "cuda"])
    executor = ModelExecutor(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                          kv_cache_memory=1 << 20, moe_backend="triton"))
    assert executor.model.layers[1].mlp.backend.name == executor.moe_backend == "triton"
    assert executor.model.layers[1].mlp.experts.w13.shape == (12, 32, 32)  # stacked, unpacked: what kernels read
    default = ModelExecutor(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 20))
    assert default.model.layers[1].mlp.backend.name == default.moe_backend == "torch"  # auto on the CPU
