"""The fused CPU kernels (``engine/cpu_kernels.c``, ``cpu_attention.c``) against the PyTorch code
they replace.

The element-wise kernels must give bit-identical bf16 results (they round where PyTorch rounds);
the attention kernel must agree with float32 SDPA to bf16 precision, for decode rows and prompt
rows alike. Then the whole model: the fused forward and the PyTorch forward, loaded from the
same weights, must be as close to the float32 model as each other and pick the same tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmtree.config import Settings
from llmtree.engine import kernel_build, loader, native
from llmtree.engine.llama import LlamaForward
from llmtree.engine.runner import ModelRunner
from llmtree.engine.scheduler import PrefillChunk, StepPlan
from llmtree.engine.sequence import Sequence, SequenceStatus
from llmtree.protocol import SamplingParams

from cluster import model_cache

HEADS, KV_HEADS, HEAD_DIM, SLOTS, MAX_LEN = 9, 3, 64, 8, 256
EPS = 1e-5

NEAR_TIE = 0.25
"""Two float32 logits closer than this are a tie for bf16 arithmetic (a bf16 step near 20 is
0.125)."""


@pytest.fixture(scope="module")
def kernels() -> native.CpuKernels:
    built = native.load()
    assert built is not None, "the CPU kernels did not build (is a C compiler installed?)"
    return built


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS)
    return hidden.to(x.dtype) * weight


def rope_tables(head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(MAX_LEN).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin().bfloat16()
    half = head_dim // 2
    return emb.cos().bfloat16(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def unblock_keys(k_cache: torch.Tensor) -> torch.Tensor:
    """The kernels' blocked key layout back to ``[slots, kv_heads, max_len, head_dim]``."""
    slots, heads, max_len, head_dim = k_cache.shape
    blocked = k_cache.view(slots, heads, max_len // native.KEY_BLOCK, head_dim, native.KEY_BLOCK)
    return blocked.permute(0, 1, 2, 4, 3).reshape(slots, heads, max_len, head_dim)


def block_keys(keys: torch.Tensor) -> torch.Tensor:
    slots, heads, max_len, head_dim = keys.shape
    rows = keys.view(slots, heads, max_len // native.KEY_BLOCK, native.KEY_BLOCK, head_dim)
    return rows.permute(0, 1, 2, 4, 3).contiguous().view(slots, heads, max_len, head_dim)


def test_rms_norm_is_bit_identical(kernels: native.CpuKernels) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(7, 576).bfloat16() * 3, torch.randn(576).bfloat16()
    assert torch.equal(kernels.rms_norm(x, weight, EPS), hf_rms_norm(x, weight))
    rows = torch.randn(12, 576).bfloat16()[::3]  # strided rows, as x[sample_rows] may be
    assert torch.equal(kernels.rms_norm(rows, weight, EPS), hf_rms_norm(rows, weight))
    many = torch.randn(64, 576).bfloat16()[::2]  # 32 strided rows, shared between threads
    assert torch.equal(kernels.rms_norm(many, weight, EPS), hf_rms_norm(many, weight))


@pytest.mark.parametrize("rows", [5, 32])  # 8 or more rows run on every thread
def test_add_rms_norm_updates_the_residual_in_place(kernels: native.CpuKernels, rows: int) -> None:
    torch.manual_seed(1)
    x, delta = torch.randn(rows, 576).bfloat16(), torch.randn(rows, 576).bfloat16()
    weight = torch.randn(576).bfloat16()
    expected_x = x + delta
    out = kernels.add_rms_norm(x, delta, weight, EPS)
    assert torch.equal(x, expected_x)
    assert torch.equal(out, hf_rms_norm(expected_x, weight))


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_silu_mul_is_bit_identical(kernels: native.CpuKernels, rows: int) -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(rows, 2 * 1536).bfloat16() * 6
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_mul(gate_up), F.silu(gate) * up)


def layer(
    kernels: native.CpuKernels,
    qkv: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    threads: int = 2,
) -> torch.Tensor:
    """One layer's ``rope_attention`` with the test tables; returns the attention output."""
    cos, sin = rope_tables()
    out = torch.empty(qkv.shape[0], HEADS * HEAD_DIM).bfloat16()
    lengths = positions + 1
    kernels.rope_attention(
        qkv, cos, sin, slots, positions, lengths, HEADS, k_cache, v_cache, out, threads
    )
    return out


def test_rope_rotates_and_writes_the_cache(kernels: native.CpuKernels) -> None:
    torch.manual_seed(3)
    cos, sin = rope_tables()
    rows = 10  # 8 or more rows run on every thread
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM).bfloat16()
    slots = torch.tensor([0, 1, 7, 7, 2, 3, 4, 5, 6, 0])
    positions = torch.tensor([0, 15, 16, 17, 100, MAX_LEN - 1, 30, 31, 32, 1])
    heads = qkv.view(rows, -1, HEAD_DIM).clone()
    qk = heads[:, : HEADS + KV_HEADS]
    half = HEAD_DIM // 2
    rotated = qk * cos[positions, None] + qk.roll(half, dims=-1) * sin[positions, None]
    k_cache = torch.zeros(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM).bfloat16()
    v_cache = torch.zeros_like(k_cache)
    layer(kernels, qkv, slots, positions, k_cache, v_cache)
    out = qkv.view(rows, -1, HEAD_DIM)
    assert torch.equal(out[:, : HEADS + KV_HEADS], rotated)
    assert torch.equal(out[:, HEADS + KV_HEADS :], heads[:, HEADS + KV_HEADS :])  # v untouched
    keys = unblock_keys(k_cache)
    written = torch.zeros(SLOTS, MAX_LEN, dtype=torch.bool)
    for row in range(rows):
        slot, position = int(slots[row]), int(positions[row])
        assert torch.equal(keys[slot, :, position], rotated[row, HEADS:])
        assert torch.equal(v_cache[slot, :, position], heads[row, HEADS + KV_HEADS :])
        written[slot, position] = True
    assert not keys.permute(0, 2, 1, 3)[~written].any()  # nothing else was written
    assert not v_cache.permute(0, 2, 1, 3)[~written].any()


def test_rows_outside_the_cache_write_nothing(kernels: native.CpuKernels) -> None:
    qkv = torch.randn(3, (HEADS + 2 * KV_HEADS) * HEAD_DIM).bfloat16()
    k_cache = torch.zeros(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM).bfloat16()
    v_cache = torch.zeros_like(k_cache)
    slots, positions = torch.tensor([SLOTS, -1, 0]), torch.tensor([0, 0, MAX_LEN])
    out = layer(kernels, qkv, slots, positions, k_cache, v_cache)
    assert not k_cache.any() and not v_cache.any()
    assert not out[:2].any()  # no slot: no attention either


def test_attention_matches_sdpa_for_decode_and_prompt_rows(kernels: native.CpuKernels) -> None:
    torch.manual_seed(4)
    keys = torch.randn(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM).bfloat16()
    k_cache, v_cache = block_keys(keys), torch.randn_like(keys)
    # two decode rows, then a 5-token prompt chunk of slot 3 at positions 40..44 (causal)
    slots = torch.tensor([5, 0, 3, 3, 3, 3, 3])
    positions = torch.tensor([0, MAX_LEN - 1, 40, 41, 42, 43, 44])
    qkv = torch.randn(len(slots), (HEADS + 2 * KV_HEADS) * HEAD_DIM).bfloat16()
    out = layer(kernels, qkv, slots, positions, k_cache, v_cache)
    keys, values = unblock_keys(k_cache), v_cache  # each row's own key and value written first
    for row in range(len(slots)):
        slot, length = int(slots[row]), int(positions[row]) + 1
        query = qkv[row].view(-1, HEAD_DIM)[:HEADS].float().unsqueeze(1)  # rotated, in place
        expected = F.scaled_dot_product_attention(
            query,
            keys[slot, :, :length].float().repeat_interleave(HEADS // KV_HEADS, dim=0),
            values[slot, :, :length].float().repeat_interleave(HEADS // KV_HEADS, dim=0),
        )
        assert torch.allclose(out[row].float(), expected.reshape(-1), atol=8e-3, rtol=1e-2), row


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(4, 4, 64), (8, 4, 64), (8, 2, 64), (10, 2, 32), (6, 2, 128)],
    ids=["1-per-kv-head", "2-per-kv-head", "4-per-kv-head", "5-per-kv-head-dim-32", "dim-128"],
)
def test_attention_matches_sdpa_for_other_head_shapes(
    kernels: native.CpuKernels, heads: int, kv_heads: int, head_dim: int
) -> None:
    """The model's shape (9 heads over 3) has its own compiled copy; other shapes, compiled
    copies and the general loop alike, must compute the same attention."""
    torch.manual_seed(7)
    keys = torch.randn(SLOTS, kv_heads, MAX_LEN, head_dim).bfloat16()
    k_cache, v_cache = block_keys(keys), torch.randn_like(keys)
    slots = torch.tensor([1, 4, 6, 6])
    positions = torch.tensor([0, 37, MAX_LEN - 1, 17])  # 1, 3 and 16 blocks and a partial one
    qkv = torch.randn(len(slots), (heads + 2 * kv_heads) * head_dim).bfloat16()
    cos, sin = rope_tables(head_dim)
    out = torch.empty(len(slots), heads * head_dim).bfloat16()
    kernels.rope_attention(
        qkv, cos, sin, slots, positions, positions + 1, heads, k_cache, v_cache, out, 2
    )
    keys = unblock_keys(k_cache)
    for row in range(len(slots)):
        slot, length = int(slots[row]), int(positions[row]) + 1
        query = qkv[row].view(-1, head_dim)[:heads].float().unsqueeze(1)
        expected = F.scaled_dot_product_attention(
            query,
            keys[slot, :, :length].float().repeat_interleave(heads // kv_heads, dim=0),
            v_cache[slot, :, :length].float().repeat_interleave(heads // kv_heads, dim=0),
        )
        assert torch.allclose(out[row].float(), expected.reshape(-1), atol=8e-3, rtol=1e-2), row


def test_attention_of_a_row_does_not_depend_on_the_batch(kernels: native.CpuKernels) -> None:
    torch.manual_seed(5)
    k_cache = block_keys(torch.randn(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM).bfloat16())
    v_cache = torch.randn(SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM).bfloat16()
    qkv = torch.randn(SLOTS, (HEADS + 2 * KV_HEADS) * HEAD_DIM).bfloat16()
    slots, positions = torch.arange(SLOTS), torch.randint(0, MAX_LEN, (SLOTS,))
    alone_qkv = qkv[3:4].clone()
    together = layer(kernels, qkv, slots, positions, k_cache, v_cache, threads=2)
    # row 3 again, by itself on one thread: it writes the same key and value, reads the same
    alone = layer(kernels, alone_qkv, slots[3:4], positions[3:4], k_cache, v_cache, threads=1)
    assert torch.equal(alone[0], together[3])


def test_argmax_is_the_first_largest(kernels: native.CpuKernels) -> None:
    torch.manual_seed(6)
    logits = torch.randn(5, 49152).bfloat16()
    logits[2, 7] = logits[2, 9000] = 100.0  # a tie: the first index wins, as in torch
    logits[3] = -5.0
    logits[4] = torch.full((49152,), float("-inf")).bfloat16()
    logits[4, 4321] = -1e30
    assert kernels.argmax(logits) == logits.float().argmax(dim=-1).tolist()


def test_no_compiler_means_no_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMTREE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    assert kernel_build.build() is None
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails: a warning, no library
    assert kernel_build.build() is None
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_a_build_is_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMTREE_KERNEL_CACHE", str(tmp_path))
    first = kernel_build.build()
    assert first is not None and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    assert kernel_build.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


TEXTS = [
    "The capital of France is Paris. The capital of Italy is",
    "Water boils at",
    "Here is a short story about a dragon who lived in a cave near the sea. One day, the dragon",
]


def _load() -> loader.LoadedModel:
    settings = Settings(model_cache=Path(model_cache()))
    return loader.load(settings.model, settings.model_cache_dir, torch.device("cpu"), print)


def _runner(allow_native: bool) -> ModelRunner:
    forward = LlamaForward(_load().model, 512, torch.bfloat16, allow_native=allow_native)
    assert (forward.kernels is not None) == allow_native
    return ModelRunner(forward, 4, 512, eos_token_ids=[])


@pytest.mark.model
def test_the_fused_forward_computes_what_the_pytorch_forward_computes() -> None:
    fused, plain = _runner(True), _runner(False)
    loaded = _load()
    prompts = [loaded.tokenizer(text)["input_ids"] for text in TEXTS]
    reference = loaded.model.float()
    with torch.inference_mode():
        exact = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts[:2]])
    sequences: dict[bool, list[Sequence]] = {}
    logits: dict[bool, torch.Tensor] = {}
    for flag, runner in ((True, fused), (False, plain)):
        seqs = []
        for slot, prompt in enumerate(prompts):
            seq = Sequence(f"r{slot}", prompt, SamplingParams(max_tokens=32, temperature=0))
            seq.slot, seq.status = slot, SequenceStatus.RUNNING
            seqs.append(seq)
        # one step prefills two prompts while nothing decodes; the third comes in two chunks
        first, second, third = seqs
        plan = StepPlan(
            prefills=[
                PrefillChunk(first, 0, len(first.prompt_ids)),
                PrefillChunk(second, 0, len(second.prompt_ids)),
            ]
        )
        logits[flag] = runner.model.forward(runner._build(plan), runner.cache).float()
        half = len(third.prompt_ids) // 2
        runner.run(StepPlan(prefills=[PrefillChunk(third, 0, half)]))
        rest = len(third.prompt_ids) - half
        third.output_ids.append(runner.run(StepPlan(prefills=[PrefillChunk(third, half, rest)]))[0])
        first.output_ids.append(int(logits[flag][0].argmax()))
        second.output_ids.append(int(logits[flag][1].argmax()))
        for seq in seqs:
            seq.num_computed_tokens = len(seq.prompt_ids)
        for _ in range(24):  # decode all three together, in slots 0..2
            tokens = runner.run(StepPlan(decodes=seqs))
            for seq, token in zip(seqs, tokens, strict=True):
                seq.num_computed_tokens += 1
                seq.output_ids.append(token)
        sequences[flag] = seqs
    # bf16 is bf16: both are off the float32 logits, the fused one no more than the other
    error = {flag: (logits[flag] - exact).abs().mean().item() for flag in (True, False)}
    assert error[True] < 0.2 and error[True] <= 1.1 * error[False], error
    assert logits[True].argmax(-1).tolist() == exact.argmax(-1).tolist()
    assert logits[False].argmax(-1).tolist() == exact.argmax(-1).tolist()
    # The decode steps (three rows) take the 4-bit forms: the file's exact weights, times the
    # inputs in 8 bits (llama.cpp's Q4_1 x Q8_1). The greedy text is the float32 model's but
    # where float32 nearly ties its two best tokens (measured: the first prompt's sixth token,
    # 0.04 apart); there it may take the second, and the texts part from there. (PyTorch's int4
    # path, whose scales are rounded to bf16, parts at the same token, so it is held to the
    # logits above only.)
    with torch.inference_mode():
        for seq in sequences[True]:
            prompt = torch.tensor([seq.prompt_ids])
            greedy = reference.generate(prompt, max_new_tokens=25, do_sample=False)
            expected = greedy[0, prompt.shape[1] :].tolist()
            parted = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(seq.output_ids, expected, strict=True))
                    if a != b
                ),
                None,
            )
            if parted is not None:
                scores = reference(greedy[:, :-1]).logits[0, prompt.shape[1] - 1 + parted]
                best = scores.topk(2)
                gap = float(best.values[0] - best.values[1])
                assert gap < NEAR_TIE and seq.output_ids[parted] == int(best.indices[1]), (
                    parted,
                    gap,
                )


@pytest.mark.model
def test_the_head_of_the_default_model_is_its_exact_q8_form(kernels: native.CpuKernels) -> None:
    """SmolLM2's GGUF file holds the token embedding (its tied output head) as Q8_0: one-row steps
    multiply by those exact values, and land at least as near the float32 logits as bf16 does."""
    loaded = _load()
    prompt = loaded.tokenizer(TEXTS[0])["input_ids"]
    with torch.inference_mode():
        exact = loaded.model.float()(torch.tensor([prompt])).logits[0, -1]
    runner = _runner(True)
    head = runner.model.lm_head
    assert (head.q8 is not None) == kernels.has_q8
    assert all(layer.qkv.q8 is None and layer.down.q8 is None for layer in runner.model.layers)
    if head.q8 is None:
        return
    logits = {}
    for name, form in (("q8", head.q8), ("bf16", None)):
        head.q8 = form
        seq = Sequence(name, prompt, SamplingParams(max_tokens=4, temperature=0))
        seq.slot, seq.status = 0, SequenceStatus.RUNNING
        plan = StepPlan(prefills=[PrefillChunk(seq, 0, len(prompt))])
        logits[name] = runner.model.forward(runner._build(plan), runner.cache).float()[0]
        runner.release([0])
    error = {name: (value - exact).abs().mean().item() for name, value in logits.items()}
    assert error["q8"] < 0.2 and error["q8"] <= 1.05 * error["bf16"], error
    assert int(logits["q8"].argmax()) == int(exact.argmax())


def test_a_folder_others_can_write_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    monkeypatch.setenv("LLMTREE_KERNEL_CACHE", str(shared))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    built = kernel_build.build()
    assert built is not None and built.parent == tmp_path / "tmp" / f"llmtree-kernels-{os.getuid()}"
    assert not list(shared.iterdir())


@pytest.mark.model
def test_the_layer_loop_in_one_call_is_the_python_loop_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lt_layers`` (``cpu_layers.c``) runs the same kernels as the Python loop of
    ``_forward_native``: prompt rows (dense products), one to four decode rows (4-bit), more
    decode rows (dense), and decode rows beside a prompt chunk (4-bit and dense in one product)
    must all give the same logits and write the same cache."""
    forward = LlamaForward(_load().model, 512, torch.bfloat16)
    runner = ModelRunner(forward, 8, 512, eos_token_ids=[])
    assert forward.kernels is not None
    if not forward.kernels.has_amx:
        pytest.skip("the one-call layer loop needs AMX products")
    prompts = [[100 + 7 * slot + i for i in range(20 + slot)] for slot in range(8)]
    seqs = []
    for slot, prompt in enumerate(prompts):
        seq = Sequence(f"r{slot}", prompt, SamplingParams(max_tokens=8, temperature=0))
        seq.slot, seq.status = slot, SequenceStatus.RUNNING
        seqs.append(seq)

    def both(plan: StepPlan) -> torch.Tensor:
        """The plan's logits by the one-call loop, then again by the Python loop (the second
        writes the same keys and values over the first's)."""
        batch = runner._build(plan)
        one_call = forward.forward(batch, runner.cache)
        assert forward._layer_loop is not None
        with monkeypatch.context() as patch:
            patch.setattr(forward, "_native_layers", lambda kernels, cache: None)
            python = forward.forward(runner._build(plan), runner.cache)
        assert torch.equal(one_call, python)
        return one_call

    both(StepPlan(prefills=[PrefillChunk(seq, 0, len(seq.prompt_ids)) for seq in seqs[:7]]))
    for seq in seqs[:7]:
        seq.num_computed_tokens = len(seq.prompt_ids)
        seq.output_ids.append(5)
    last = seqs[7]
    for decoding, plan in (
        (1, StepPlan(decodes=seqs[:1])),
        (4, StepPlan(decodes=seqs[:4])),
        (7, StepPlan(decodes=seqs[:7])),
        (3, StepPlan(decodes=seqs[:3], prefills=[PrefillChunk(last, 0, 9)])),
    ):
        logits = both(plan)
        assert logits.shape[0] == decoding  # the prompt chunk does not end its prompt
        for seq in plan.decodes:
            seq.num_computed_tokens += 1
            seq.output_ids.append(int(logits[plan.decodes.index(seq)].argmax()))
