"""dots-serve against llama.cpp on the same GGUF files, on the CPU: decode, 8 streams, prefill, memory and fidelity.

The mid-size random Dots1 checkpoint (hidden 1024, 8 layers, 32 experts top-4, vocab 151936) is written as an F32
GGUF by scripts/hf_to_gguf.py and quantized to Q8_0 and Q4_K_M by llama.cpp's own quantizer; the files are cached in
``--work-dir``. For each file, one engine after the other (never at once, each in a subprocess of its own):

- llama.cpp (llama-cpp-python, 2 threads): greedy decode of 128 tokens after a short prompt, a 512-token prefill, the
  VmRSS of its process;
- dots-serve: a real server (``dots-serve --model FILE``) driven through the ``openai`` client: one stream of 128
  tokens, 8 concurrent streams, the time of a 512-token prompt with max_tokens=1, the VmRSS of the server's process
  tree;
- fidelity: Transformers' Dots1 in float32 on the same checkpoint greedily continues 4 prompts by 64 tokens; each
  engine scores those sequences teacher-forced; the excess negative log-likelihood per token over the reference's own.

Then a slice of the real dots.llm1 (2 MoE layers, vocab trimmed) with random valid Q4_K/Q5_0 blocks: decode tok/s of
the model in-process and the weight bytes each token reads, against the machine's measured read bandwidth.

llama-cpp-python has no Linux wheel on PyPI; pip builds it from source (a C++ compiler and CMake, some minutes):

    .venv/bin/pip install -e '.[bench-llamacpp]'     # or: .venv/bin/pip install llama-cpp-python==0.3.36

    .venv/bin/python bench/gguf_bench.py [--work-dir /tmp/dots-gguf-bench] [--write BENCHMARKS.md]
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
THREADS = 2
FILE_TYPES = ("Q8_0", "Q4_K_M")
MID_SIZE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5, max_position_embeddings=2048,
                sliding_window=None, tie_word_embeddings=False, bos_token_id=None, eos_token_id=[4095, 4089],
                pad_token_id=4089, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
LLM1_SLICE = dict(vocab_size=4096, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                  num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=0,
                  norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5, max_position_embeddings=2048,
                  rope_theta=1e7, scoring_func="sigmoid")
FIDELITY_PROMPTS = ("In the beginning God created the heaven and the earth.",
                    "And the LORD spake unto Moses, saying,",
                    "Blessed are the meek: for they shall inherit",
                    "The LORD is my shepherd; I shall not want.")
DECODE_TOKENS, CONTINUATION_TOKENS, PREFILL_TOKENS, STREAMS = 128, 64, 512, 8
SHORT_PROMPT = "And God said, Let there be light: and there was light."


def import_hf_to_gguf():
    spec = importlib.util.spec_from_file_location("hf_to_gguf", REPO / "scripts" / "hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenize(text: str) -> list[int]:
    from transformers import AutoTokenizer

    from model.embedded import EMBEDDED_MODEL_DIR
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR).encode(text, add_special_tokens=False)


def prefill_prompt(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 4000, PREFILL_TOKENS).tolist()


# ---------------------------------------------------------------- files


def prepare_mid_size(work: Path) -> dict[str, Path]:
    """The HF checkpoint and its Q8_0/Q4_K_M GGUFs under ``work``, made once."""
    hf_dir, f32 = work / "mid-size-hf", work / "mid-size-F32.gguf"
    files = {ftype: work / f"mid-size-{ftype}.gguf" for ftype in FILE_TYPES}
    if not (hf_dir / "config.json").exists():
        from bench.mid_size import write_mid_size_checkpoint
        from model.embedded import EMBEDDED_MODEL_DIR
        write_mid_size_checkpoint(hf_dir, MID_SIZE)  # this bench's MID_SIZE: issue 16's vocabulary and experts
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(EMBEDDED_MODEL_DIR / name, hf_dir / name)
    if not f32.exists() and not all(path.exists() for path in files.values()):
        import_hf_to_gguf().write_dots1_gguf(hf_dir, f32, "F32")
    for ftype, path in files.items():
        if not path.exists():
            import llama_cpp
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.nthread = THREADS
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {f32} to {ftype}")
    return {"hf": hf_dir, **files}


def random_block_bytes(qtype, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose float16 scales are small, finite and positive (Q4_K: d, dmin; Q5_0: d)."""
    import gguf
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = int(np.prod(shape)) // block_size
    data = rng.integers(0, 256, (blocks, type_size), dtype=np.uint8)
    scales = 2 if qtype == gguf.GGMLQuantizationType.Q4_K else 1
    data[:, :2 * scales] = rng.uniform(1e-4, 2e-3, (blocks, scales)).astype(np.float16).view(np.uint8)
    return data.reshape(-1)


def prepare_llm1_slice(work: Path) -> Path:
    """dots.llm1's layer shapes, 2 MoE layers, vocab 4096: Q4_K weights, Q5_0 where the input is 1408 wide."""
    import gguf

    from model.embedded import EMBEDDED_MODEL_DIR
    path = work / "llm1-slice-Q4_K.gguf"
    if path.exists():
        return path
    hf = import_hf_to_gguf()
    c, Q = LLM1_SLICE, gguf.GGMLQuantizationType
    hidden, heads, head_dim, experts = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["n_routed_experts"]
    shared, inter = c["n_shared_experts"] * c["moe_intermediate_size"], c["moe_intermediate_size"]
    tensors = [("token_embd.weight", [c["vocab_size"], hidden], Q.Q4_K)]
    for layer in range(c["num_hidden_layers"]):
        blk = f"blk.{layer}"
        tensors += [(f"{blk}.attn_norm.weight", [hidden], Q.F32), (f"{blk}.ffn_norm.weight", [hidden], Q.F32),
                    (f"{blk}.attn_q_norm.weight", [head_dim], Q.F32), (f"{blk}.attn_k_norm.weight", [head_dim], Q.F32),
                    (f"{blk}.attn_q.weight", [heads * head_dim, hidden], Q.Q4_K),
                    (f"{blk}.attn_k.weight", [heads * head_dim, hidden], Q.Q4_K),
                    (f"{blk}.attn_v.weight", [heads * head_dim, hidden], Q.Q4_K),
                    (f"{blk}.attn_output.weight", [hidden, heads * head_dim], Q.Q4_K),
                    (f"{blk}.ffn_gate_inp.weight", [experts, hidden], Q.F32),
                    (f"{blk}.exp_probs_b.bias", [experts], Q.F32),
                    (f"{blk}.ffn_gate_exps.weight", [experts, inter, hidden], Q.Q4_K),
                    (f"{blk}.ffn_up_exps.weight", [experts, inter, hidden], Q.Q4_K),
                    (f"{blk}.ffn_down_exps.weight", [experts, hidden, inter], Q.Q5_0),
                    (f"{blk}.ffn_gate_shexp.weight", [shared, hidden], Q.Q4_K),
                    (f"{blk}.ffn_up_shexp.weight", [shared, hidden], Q.Q4_K),
                    (f"{blk}.ffn_down_shexp.weight", [hidden, shared], Q.Q4_K)]
    tensors += [("output_norm.weight", [hidden], Q.F32), ("output.weight", [c["vocab_size"], hidden], Q.Q4_K)]
    writer = gguf.GGUFWriter(path, "dots1")
    for name, shape, qtype in tensors:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), hf.tensor_nbytes(shape, qtype), qtype)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("dots.llm1 slice (random Q4_K)")
    hf.add_hyperparameters(writer, c)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hf.add_vocab(writer, EMBEDDED_MODEL_DIR, c["vocab_size"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape, qtype in tensors:
        if qtype == Q.F32:
            values = 0.1 * rng.standard_normal(shape, dtype=np.float32)
            writer.write_tensor_data(values + 1.0 if name.endswith("norm.weight") else values)
        else:
            writer.write_tensor_data(random_block_bytes(qtype, shape, rng))
    writer.close()
    return path


def active_bytes_per_token(path: Path) -> int:
    """Weight bytes one decoded token reads: attention, shared experts, top-k routed experts, router, lm_head."""
    import gguf
    reader = gguf.GGUFReader(path)
    top_k = int(reader.get_field("dots1.expert_used_count").contents())
    total = 0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            total += tensor.n_bytes // tensor.shape[-1]
        elif "_exps." in tensor.name:
            total += tensor.n_bytes * top_k // tensor.shape[-1]
        else:
            total += tensor.n_bytes
    return int(total)


# ---------------------------------------------------------------- workers (each runs in its own process)


def llamacpp_speed(path: str) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048, n_batch=512,
                          verbose=False)
    ctx, vocab = llm._ctx.ctx, llm.n_vocab()

    def last_argmax() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).argmax())

    result = {}
    llm.reset()
    llm.eval(tokenize(SHORT_PROMPT)[:8])  # warm-up

    def prefill() -> float:
        times = []
        for seed in range(3):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prefill_prompt(seed))
            times.append(time.perf_counter() - start)
        return PREFILL_TOKENS / min(times)

    def decode() -> tuple[float, float]:
        llm.reset()
        llm.eval(tokenize(SHORT_PROMPT))
        llama_cpp.llama_perf_context_reset(ctx)
        token = last_argmax()
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([token])
            token = last_argmax()
        perf = llama_cpp.llama_perf_context(ctx)
        return DECODE_TOKENS / (time.perf_counter() - start), perf.n_eval / (perf.t_eval_ms / 1e3)

    result["prefill_tok_s"] = quiet_run(prefill, os.getpid())
    result["decode_tok_s"], result["decode_tok_s_internal"] = quiet_run(decode, os.getpid())
    result["rss_bytes"] = process_tree_rss(os.getpid())
    return result


def llamacpp_nll(path: str, sequences: list[dict]) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=256, n_batch=256,
                          logits_all=True, verbose=False)
    logits = []
    for seq in sequences:
        llm.reset()
        llm.eval(seq["prompt"] + seq["continuation"])
        logits.append(np.array(llm.scores[:llm.n_tokens]))
    return {"nll": mean_nll(logits, sequences)}


def dots_nll(path: str, sequences: list[dict]) -> dict:
    import torch

    from model.loader import load_model
    torch.set_num_threads(THREADS)
    model = load_model(path, dtype=torch.float32, device="cpu")
    return {"nll": mean_nll([forward_all(model, s["prompt"] + s["continuation"]).numpy() for s in sequences],
                            sequences)}


def dots_slice_decode(path: str) -> dict:
    import torch

    from model.loader import load_model
    torch.set_num_threads(THREADS)
    model = load_model(path, dtype=torch.float32, device="cpu")
    runner = SequenceRunner(model, max_tokens=128)
    with torch.inference_mode():
        logits = runner.step(list(range(10, 18)))
        if not torch.isfinite(logits).all():
            raise ValueError("the slice's logits are not finite")
        token = int(logits.argmax())
        for _ in range(4):
            token = int(runner.step([token]).argmax())

        def decode(steps: int = 16) -> float:
            nonlocal token
            start = time.perf_counter()
            for _ in range(steps):
                token = int(runner.step([token]).argmax())
            return steps / (time.perf_counter() - start)

        return {"decode_tok_s": quiet_run(decode, os.getpid()), "rss_bytes": process_tree_rss(os.getpid())}


def llamacpp_slice_decode(path: str) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=256, verbose=False)
    llm.eval(list(range(10, 18)))
    for token in range(4):
        llm.eval([100 + token])

    def decode(steps: int = 16) -> float:
        start = time.perf_counter()
        for token in range(steps):
            llm.eval([200 + token])
        return steps / (time.perf_counter() - start)

    return {"decode_tok_s": quiet_run(decode, os.getpid())}


def read_bandwidth() -> dict:
    import torch
    torch.set_num_threads(THREADS)
    data = torch.ones(2 * 1024 ** 3 // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return {"bytes_per_s": data.numel() * 4 / min(times)}


class SequenceRunner:
    """One sequence through the engine's model: flat batches over a paged cache, as the engine runs it."""

    def __init__(self, model, max_tokens: int, block_size: int = 16):
        from model.kv_cache import allocate_kv_cache
        self.model, self.block_size, self.cached = model, block_size, 0
        num_blocks = -(-max_tokens // block_size)
        self.block_table = list(range(num_blocks))
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, model.embed_tokens.weight.dtype,
                                           "cpu", model.parallel)

    def step(self, tokens: list[int], all_logits: bool = False):
        from model.forward_batch import ForwardBatch
        indices = list(range(len(tokens))) if all_logits else None
        batch = ForwardBatch.build([tokens], [self.cached], [self.block_table], self.block_size, indices)
        logits = self.model(batch, self.kv_caches)
        self.cached += len(tokens)
        return logits if all_logits else logits[0]


def forward_all(model, tokens: list[int]):
    import torch
    with torch.inference_mode():
        return SequenceRunner(model, len(tokens)).step(tokens, all_logits=True).float()


def mean_nll(logits: list[np.ndarray], sequences: list[dict]) -> float:
    """Mean negative log-likelihood of the continuations, from every position's logits of prompt + continuation."""
    total, count = 0.0, 0
    for rows, seq in zip(logits, sequences):
        start, cont = len(seq["prompt"]) - 1, np.array(seq["continuation"])
        rows = rows[start:start + len(cont)].astype(np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        total += float((log_z - rows[np.arange(len(cont)), cont]).sum())
        count += len(cont)
    return total / count


def reference_sequences(hf_dir: Path, cache: Path) -> list[dict]:
    """Transformers' float32 greedy continuations of the prompts and its own NLL on them (cached as JSON)."""
    if cache.exists():
        return json.loads(cache.read_text())
    import torch
    from transformers import Dots1ForCausalLM
    torch.set_num_threads(THREADS)
    model = Dots1ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sequences = []
    with torch.inference_mode():
        for text in FIDELITY_PROMPTS:
            prompt = tokenize(text)
            out = model.generate(torch.tensor([prompt]), max_new_tokens=CONTINUATION_TOKENS, min_new_tokens=CONTINUATION_TOKENS,
                                 do_sample=False, pad_token_id=4089)
            continuation = out[0, len(prompt):].tolist()
            logits = model(out).logits[0].numpy()
            seq = {"prompt": prompt, "continuation": continuation}
            seq["nll"] = mean_nll([logits], [seq])
            sequences.append(seq)
    cache.write_text(json.dumps(sequences))
    return sequences


WORKERS = {"llamacpp_speed": llamacpp_speed, "llamacpp_nll": llamacpp_nll, "dots_nll": dots_nll,
           "dots_slice_decode": dots_slice_decode, "llamacpp_slice_decode": llamacpp_slice_decode,
           "read_bandwidth": read_bandwidth}


def run_worker(name: str, *args) -> dict:
    """Runs a worker in a fresh process (its memory and threads are its own) and returns its JSON result."""
    wait_for_idle_cpu()
    argv = [sys.executable, __file__, "--worker", name, "--worker-args", json.dumps(args)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- machine state


def process_tree_rss(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and all its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def busy_cores(interval: float = 2.0) -> float:
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)
    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1) * os.cpu_count()


def cpu_seconds(pid: int | None = None) -> float:
    """Busy CPU seconds of the whole machine (``pid`` None) or of ``pid`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is None:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / tick
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else None
        except OSError:
            continue
        if stat and is_descendant(int(entry.name), pid):
            total += int(stat[11]) + int(stat[12])
    return total / tick


def is_descendant(child: int, pid: int) -> bool:
    while child > 1:
        if child == pid:
            return True
        try:
            child = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            return False
    return False


def quiet_run(phase, pid: int, tries: int = 4, limit: float = 0.25):
    """``phase()`` on idle cores, repeated while other processes took more than ``limit`` cores during it (the
    machine is shared: another job's threads make OpenMP/ggml threads wait at every barrier)."""
    for attempt in range(tries):
        wait_for_idle_cpu()
        machine, ours, start = cpu_seconds(), cpu_seconds(pid), time.perf_counter()
        result = phase()
        wall = time.perf_counter() - start
        foreign = max(0.0, (cpu_seconds() - machine) - (cpu_seconds(pid) - ours)) / wall
        if foreign <= limit or attempt == tries - 1:
            if foreign > limit:
                log(f"warning: other processes took {foreign:.2f} cores during every try; keeping the last")
            return result
        log(f"other processes took {foreign:.2f} cores during the phase; measuring again")


def wait_for_idle_cpu(limit_s: float = 1200.0, threshold: float = 0.3) -> None:
    """Waits until the machine's cores are (nearly) idle, so that timings are not shared with another job."""
    deadline = time.monotonic() + limit_s
    while (busy := busy_cores()) > threshold:
        if time.monotonic() > deadline:
            log(f"warning: still {busy:.1f} cores busy after {limit_s:.0f} s; measuring anyway")
            return
        top = subprocess.run(["ps", "-eo", "pcpu,pid,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
        log(f"{busy:.1f} cores busy, waiting:\n" + "\n".join(top.splitlines()[:4]))
        time.sleep(20)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- dots-serve server


class Server:
    def __init__(self, path: Path, port: int, log_path: Path):
        self.path, self.port, self.log_path = path, port, log_path

    def __enter__(self) -> "Server":
        import httpx
        import openai
        self.log_file = open(self.log_path, "w")
        # The KV cache holds 2048 tokens (float32), llama.cpp's n_ctx here, rather than the CPU default of 1 GiB.
        command = [str(REPO / ".venv/bin/dots-serve"), "--model", str(self.path), "--port", str(self.port),
                   "--max-model-len", "2048", "--device", "cpu", "--no-ui", "--kv-cache-memory", "128MiB",
                   "--max-num-seqs", str(STREAMS)]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=600)
        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dots-serve exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready").status_code == 200:
                    self.model = self.client.models.list().data[0].id
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dots-serve not ready after 900 s; see {self.log_path}")
            time.sleep(2)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log_file.close()

    def stream(self, prompt: list[int], max_tokens: int) -> dict:
        """Greedy streamed completion; token counts from the running usage the server attaches to each chunk."""
        start, first, last, tokens = time.perf_counter(), None, None, 0
        stream = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.usage is None or chunk.usage.completion_tokens == tokens:
                continue
            now = time.perf_counter()
            if first is None:
                first, first_tokens = now, chunk.usage.completion_tokens
            last, tokens = now, chunk.usage.completion_tokens
        return {"start": start, "first": first, "last": last, "tokens": tokens, "first_tokens": first_tokens}

    def measure(self) -> dict:
        short = tokenize(SHORT_PROMPT)
        self.stream(short, 8)  # warm-up
        one = quiet_run(lambda: self.stream(short, DECODE_TOKENS), self.process.pid)
        result = {"decode_tok_s": (one["tokens"] - one["first_tokens"]) / (one["last"] - one["first"]),
                  "decode_tokens": one["tokens"]}

        def streams() -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(STREAMS) as pool:
                runs = list(pool.map(lambda i: self.stream([*short, 100 + i], DECODE_TOKENS), range(STREAMS)))
            return sum(r["tokens"] for r in runs) / (max(r["last"] for r in runs) - start)

        seeds = iter(range(1000))  # a repeated phase sends new prompts: the same ones would hit the prefix cache

        def prefill() -> float:
            times = []
            for seed in (next(seeds) for _ in range(3)):
                start = time.perf_counter()
                self.client.completions.create(model=self.model, prompt=prefill_prompt(seed), max_tokens=1,
                                               temperature=0.0)
                times.append(time.perf_counter() - start)
            return PREFILL_TOKENS / min(times)

        result["streams_tok_s"] = quiet_run(streams, self.process.pid)
        result["prefill_tok_s"] = quiet_run(prefill, self.process.pid)
        result["rss_bytes"] = process_tree_rss(self.process.pid)
        return result


# ---------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB"


def report(files: dict, results: dict, command: str) -> str:
    rows = ["| file | measure | llama.cpp | dots-serve | target | |", "|---|---|---|---|---|---|"]

    def row(ftype, measure, ours, theirs, target, ok):
        rows.append(f"| {ftype} | {measure} | {theirs} | {ours} | {target} | {'PASS' if ok else 'MISS'} |")

    for ftype in FILE_TYPES:
        lc, ds = results[ftype]["llamacpp"], results[ftype]["dots"]
        if "error" in ds:
            rows.append(f"| {ftype} | dots-serve | | failed: {ds['error']} | | MISS |")
            continue
        row(ftype, "decode tok/s, 1 stream", f"{ds['decode_tok_s']:.1f}",
            f"{lc['decode_tok_s']:.1f} (llama.cpp's own timer: {lc['decode_tok_s_internal']:.1f})",
            ">= 1.0x llama.cpp (own timer)", ds["decode_tok_s"] >= lc["decode_tok_s_internal"])
        row(ftype, f"{STREAMS} streams, aggregate tok/s", f"{ds['streams_tok_s']:.1f}",
            f"{lc['decode_tok_s_internal']:.1f} (1 stream)", ">= 3x llama.cpp 1 stream",
            ds["streams_tok_s"] >= 3 * lc["decode_tok_s_internal"])
        rows.append(f"| {ftype} | prefill tok/s ({PREFILL_TOKENS} tokens) | {lc['prefill_tok_s']:.0f} | "
                    f"{ds['prefill_tok_s']:.0f} | (beside) | |")
        row(ftype, "resident memory", gib(ds["rss_bytes"]), gib(lc["rss_bytes"]), "<= llama.cpp + 1 GiB",
            ds["rss_bytes"] <= lc["rss_bytes"] + 1024 ** 3)
        row(ftype, "excess NLL/token over f32", f"{ds['excess_nll']:+.4f}", f"{lc['excess_nll']:+.4f}",
            "<= llama.cpp + 0.25", ds["excess_nll"] <= lc["excess_nll"] + 0.25)
    s = results["slice"]
    fraction = s["bytes_per_token"] * s["dots"].get("decode_tok_s", 0) / s["bandwidth"]
    rows.append(f"| dots.llm1 slice (Q4_K/Q5_0) | decode tok/s | {s['llamacpp'].get('decode_tok_s', 0):.2f} | "
                f"{s['dots'].get('decode_tok_s', 0):.2f} | (beside) | |")
    rows.append(f"| dots.llm1 slice | bytes read per token, x tok/s vs read bandwidth | | "
                f"{s['bytes_per_token'] / 1e6:.0f} MB x {s['dots'].get('decode_tok_s', 0):.2f}/s = "
                f"{fraction:.0%} of {s['bandwidth'] / 1e9:.1f} GB/s | (beside) | |")
    sizes = ", ".join(f"{k} {Path(v).stat().st_size / 1e6:.0f} MB" for k, v in files.items() if k != "hf")
    return (f"\n## GGUF on the CPU: dots-serve vs llama.cpp (bench/gguf_bench.py)\n\n"
            f"`{command}`\n\nMid-size random Dots1 (hidden 1024, 8 layers, 32 experts top-4 + 1 shared, moe 704, "
            f"vocab 151936) quantized by llama.cpp ({sizes}); llama-cpp-python 0.3.36 built from source, "
            f"{THREADS} threads; dots-serve server on the CPU, default dtype, 2 cores. Decode: 128 greedy tokens; "
            f"fidelity: {len(FIDELITY_PROMPTS)} x {CONTINUATION_TOKENS} tokens of the f32 Transformers reference's "
            f"greedy continuations, teacher-forced.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dots-gguf-bench"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--write", type=Path, help="append the result section to this markdown file")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](*json.loads(args.worker_args))))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    files = prepare_mid_size(args.work_dir)
    sequences = reference_sequences(files["hf"], args.work_dir / "reference.json")
    reference_nll = float(np.mean([s["nll"] for s in sequences]))
    log(f"reference NLL/token {reference_nll:.4f}")
    results = {}
    for ftype in FILE_TYPES:
        path = str(files[ftype])
        lc = run_worker("llamacpp_speed", path)
        lc["excess_nll"] = run_worker("llamacpp_nll", path, sequences)["nll"] - reference_nll
        log(f"{ftype} llama.cpp: {lc}")
        try:
            wait_for_idle_cpu()
            with Server(files[ftype], args.port, args.work_dir / f"dots-serve-{ftype}.log") as server:
                ds = server.measure()
            ds["excess_nll"] = run_worker("dots_nll", path, sequences)["nll"] - reference_nll
        except Exception as e:  # a miss to record, not a crash of the whole run
            ds = {"error": str(e).splitlines()[0][:200]}
        log(f"{ftype} dots-serve: {ds}")
        results[ftype] = {"llamacpp": lc, "dots": ds}
    slice_path = prepare_llm1_slice(args.work_dir)
    results["slice"] = {"bytes_per_token": active_bytes_per_token(slice_path),
                        "bandwidth": run_worker("read_bandwidth")["bytes_per_s"]}
    for engine, worker in (("llamacpp", "llamacpp_slice_decode"), ("dots", "dots_slice_decode")):
        try:
            results["slice"][engine] = run_worker(worker, str(slice_path))
        except Exception as e:
            results["slice"][engine] = {"error": str(e)[-300:]}
    log(f"slice: {results['slice']}")
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1))
    command = ".venv/bin/python bench/gguf_bench.py " + " ".join(sys.argv[1:])
    section = report(files, results, command.strip())
    print(section)
    if args.write:
        with open(args.write, "a") as out:
            out.write(section)


if __name__ == "__main__":
    main()
