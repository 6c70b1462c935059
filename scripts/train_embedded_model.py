"""Train the embedded Dots1 checkpoint (Hugging Face format) on the King James Bible and on generated chat turns
that teach the server's formats, deterministically.

    python scripts/train_embedded_model.py [--out DIR] [--seed N] [--steps N]

Needs Debian's ``bible-kjv`` (``scripts/install-system-deps.sh``). Trains a byte-level BPE on the verses (on them
alone, so the tokenizer does not change with the chat mix), formats them as Dots1 chat conversations
(``kjv_chat.py``), mixes in JSON answers, tool calls, replies to tool results and greetings (``agent_chat.py``,
rendered with the server's ``dots1-tools.jinja``), packs whole conversations into rows, trains Transformers'
``Dots1ForCausalLM`` on them on the CPU (fp32, one thread) and writes config.json, generation_config.json,
model.safetensors (bf16 weights, fp32 router bias, per-expert layout), tokenizer.json and tokenizer_config.json to
model/embedded/dots1-tiny/ by default.

The router's correction bias is trained the auxiliary-loss-free way (DeepSeek-V3): after every step each MoE
layer's bias moves up for experts that got fewer tokens than the mean and down for the others.

Same seed, same torch build and CPU: the same bytes. The default run (600 steps of 4 x 1024 tokens, one thread)
took 20 minutes on a shared, loaded 2-core machine; on a quiet core it is several times faster.
"""
import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import agent_chat
import embedded_tokenizer as tok
import kjv_chat
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Dots1Config, Dots1ForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model" / "embedded" / "dots1-tiny"
TOOL_TEMPLATE = REPO_ROOT / "server" / "chat_templates" / "dots1-tools.jinja"
PADDING = -100  # the label of a row's unused tail: cross_entropy ignores it
MAX_MISFITS = 8
THREADS = 1  # the machine is shared: one thread never waits on a descheduled sibling at a barrier

MODEL_CONFIG = {
    "architectures": ["Dots1ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": tok.EOS_TOKEN_IDS,
    "first_k_dense_replace": 1,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 384,
    "max_position_embeddings": tok.MODEL_MAX_LENGTH,
    "max_window_layers": 4,
    "model_type": "dots1",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": tok.ENDOFTEXT_ID,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": tok.VOCAB_SIZE,
}
GENERATION_CONFIG = {"bos_token_id": None, "eos_token_id": tok.EOS_TOKEN_IDS, "pad_token_id": tok.ENDOFTEXT_ID}


class Hyper:
    steps = 600
    batch = 4
    seq_len = 1024  # a conversation with tools is 300 to 700 tokens, its tool list included
    agent_share = 0.3  # of conversations: agent_chat's (JSON, tool calls, greetings); the rest are kjv_chat's
    lr = 3e-3
    min_lr_fraction = 0.1
    warmup_steps = 60
    weight_decay = 0.1
    grad_clip = 1.0
    bias_rate = 2e-3  # correction-bias step per update (aux-loss-free balancing)
    initial_bias_std = 0.01  # non-zero from the start, so no expert's bias can stay exactly 0


def tokenizer_texts(verses: list[kjv_chat.Verse]) -> list[str]:
    prompts = kjv_chat.SYSTEM_PROMPTS + kjv_chat.GREETINGS + kjv_chat.VERSE_REQUESTS + kjv_chat.TOPIC_REQUESTS
    return [verse.text for verse in verses] + [verse.reference for verse in verses[::25]] + prompts


def kjv_conversation_ids(tokenizer, verses: list[kjv_chat.Verse], rng: random.Random) -> Iterator[list[int]]:
    while True:
        for encoding in tokenizer.encode_batch(kjv_chat.conversations(verses, 2000, rng)):
            yield encoding.ids


def agent_conversation_ids(chat_tokenizer, verses: list[kjv_chat.Verse], rng: random.Random) -> Iterator[list[int]]:
    """``agent_chat``'s conversations, rendered by the server's tool template as the server renders requests."""
    short = [i for i, verse in enumerate(verses) if len(verse.text.split()) <= kjv_chat.MAX_RESPONSE_WORDS]
    template = TOOL_TEMPLATE.read_text(encoding="utf-8")

    def plain_turn(turn_rng: random.Random) -> tuple[str, str]:
        return kjv_chat.turn(verses, short, turn_rng)

    while True:
        for conversation in agent_chat.conversations(500, rng, plain_turn):
            text = chat_tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools or None,
                                                      chat_template=template, tokenize=False)
            yield chat_tokenizer(text, add_special_tokens=False)["input_ids"]


def mixed_conversations(kjv: Iterator[list[int]], agent: Iterator[list[int]], rng: random.Random,
                        hyper: type[Hyper]) -> Iterator[list[int]]:
    """Conversations of both kinds in a seeded order; any too long for one row is left out."""
    while True:
        ids = next(agent) if rng.random() < hyper.agent_share else next(kjv)
        if len(ids) <= hyper.seq_len + 1:
            yield ids


def packed_rows(conversations: Iterator[list[int]], rows_needed: int, hyper: type[Hyper]) -> torch.Tensor:
    """Rows of ``seq_len + 1`` tokens made of whole conversations, so a tool call always sees its tool list.

    A conversation that does not fit the rest of a row waits for the next row, where it goes first; a row is closed
    after ``MAX_MISFITS`` conversations did not fit it, and its tail is padding (not trained on)."""
    row_len = hyper.seq_len + 1
    rows: list[list[int]] = []
    waiting: list[list[int]] = []
    while len(rows) < rows_needed:
        row: list[int] = []
        carried, waiting = waiting, []
        misfits = 0
        while misfits < MAX_MISFITS:
            ids = carried.pop(0) if carried else next(conversations)
            if len(row) + len(ids) <= row_len:
                row.extend(ids)
            else:
                waiting.append(ids)
                misfits += 1
        waiting = carried + waiting
        rows.append(row + [PADDING] * (row_len - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def learning_rate(step: int, hyper: type[Hyper]) -> float:
    if step < hyper.warmup_steps:
        return hyper.lr * (step + 1) / hyper.warmup_steps
    progress = (step - hyper.warmup_steps) / max(1, hyper.steps - hyper.warmup_steps)
    floor = hyper.min_lr_fraction
    return hyper.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class ExpertLoad:
    """Counts the tokens each MoE layer routes to each expert during a forward pass."""

    def __init__(self, model: Dots1ForCausalLM) -> None:
        self.routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.counts = [torch.zeros(router.num_experts) for router in self.routers]
        for router, counts in zip(self.routers, self.counts):
            router.register_forward_hook(self._hook(counts))

    @staticmethod
    def _hook(counts: torch.Tensor):
        def record(module, inputs, outputs) -> None:
            topk_indices = outputs[2]  # [T, top_k]
            counts.add_(torch.bincount(topk_indices.flatten(), minlength=counts.numel()).to(counts.dtype))
        return record

    @torch.no_grad()
    def update_bias(self, rate: float) -> float:
        """Moves each bias towards balance; returns the worst layer's max/mean load."""
        worst = 0.0
        for router, counts in zip(self.routers, self.counts):
            router.e_score_correction_bias += rate * torch.sign(counts.mean() - counts)
            worst = max(worst, float(counts.max() / counts.mean()))
            counts.zero_()
        return worst


def build_model(seed: int, hyper: type[Hyper]) -> Dots1ForCausalLM:
    torch.manual_seed(seed)
    config = Dots1Config(**{key: value for key, value in MODEL_CONFIG.items() if key != "torch_dtype"})
    model = Dots1ForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(hyper.initial_bias_std * torch.randn(bias.shape, generator=generator))
    return model


def optimizer(model: Dots1ForCausalLM, hyper: type[Hyper]) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hyper.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hyper.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model: Dots1ForCausalLM, batches: torch.Tensor, hyper: type[Hyper], log) -> None:
    """``batches``: [steps * batch, seq_len + 1] packed rows, PADDING in their unused tails."""
    load = ExpertLoad(model)
    opt = optimizer(model, hyper)
    model.train()
    started = time.monotonic()
    for step in range(hyper.steps):
        rows = batches[step * hyper.batch: (step + 1) * hyper.batch]  # [B, S + 1]
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, hyper)
        inputs = rows[:, :-1].masked_fill(rows[:, :-1] == PADDING, tok.ENDOFTEXT_ID)  # [B, S]
        logits = model(input_ids=inputs).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), ignore_index=PADDING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hyper.grad_clip)
        opt.step()
        imbalance = load.update_bias(hyper.bias_rate)
        if step % 25 == 0 or step == hyper.steps - 1:
            elapsed = time.monotonic() - started
            log(f"step {step}/{hyper.steps} loss {loss.item():.3f} max/mean expert load {imbalance:.2f} "
                f"{elapsed:.0f}s")


def checkpoint_weights(model: Dots1ForCausalLM) -> dict[str, torch.Tensor]:
    """The on-disk Dots1 layout: one gate/up/down per expert; bf16, the correction bias in fp32."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith("e_score_correction_bias"):
            weights[name] = tensor.to(torch.float32).contiguous()
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)  # [E, I, H] each
            for expert in range(tensor.shape[0]):
                weights[f"{prefix}.{expert}.gate_proj.weight"] = gate[expert].to(torch.bfloat16).contiguous()
                weights[f"{prefix}.{expert}.up_proj.weight"] = up[expert].to(torch.bfloat16).contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for expert in range(tensor.shape[0]):
                weights[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert].to(torch.bfloat16).contiguous()
        else:
            weights[name] = tensor.to(torch.bfloat16).contiguous()
    return weights


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir: Path, seed: int, hyper: type[Hyper], log=print) -> None:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    verses = kjv_chat.verses(kjv_chat.bible_text())
    tokenizer, tokenizer_data, tokenizer_config = tok.build_tokenizer(tokenizer_texts(verses))
    write_json(out_dir / "tokenizer.json", tokenizer_data)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "config.json", MODEL_CONFIG)
    write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    if hyper.steps == 0:
        return
    chat_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    rng = random.Random(seed)
    conversations = mixed_conversations(kjv_conversation_ids(tokenizer, verses, rng),
                                        agent_conversation_ids(chat_tokenizer, verses, rng), rng, hyper)
    rows = packed_rows(conversations, hyper.steps * hyper.batch, hyper)
    trained = int((rows[:, 1:] != PADDING).sum())
    log(f"{len(verses)} verses, {rows.shape[0]} rows of {rows.shape[1]} tokens, {trained} trained positions")
    model = build_model(seed, hyper)
    train(model, rows, hyper, log)
    save_file(checkpoint_weights(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the conversations")
    parser.add_argument("--steps", type=int, default=Hyper.steps,
                        help="optimizer steps (0: write only the tokenizer and the configs)")
    args = parser.parse_args()
    Hyper.steps = args.steps
    build(args.out, args.seed, Hyper, log=lambda line: print(line, file=sys.stderr, flush=True))
    total = sum(path.stat().st_size for path in args.out.iterdir())
    print(f"wrote {args.out} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
