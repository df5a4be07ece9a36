"""The GPT: shapes and counts, meta-device init, loss at init, overfitting, KV-cache decoding, GQA, sampling."""

import math

import pytest
import torch

from nanopipe.gpt import GPT, GPTConfig, build_model_config
from nanopipe.kv_cache import KVCache
from nanopipe.optim import Muon

VOCAB = 300  # not a multiple of 64: exercises the padded embedding tables


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> GPTConfig:
    kwargs = dict(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def randomized_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every weight is random: at init the output projections are zero, which would make
    attention (and so any KV-cache bug) invisible."""
    torch.manual_seed(seed)
    model = GPT.create(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 2 and p.size(0) != model.padded_vocab_size else 1.0)
    return model.eval()


# -----------------------------------------------------------------------------
# Config and sizes

def test_build_model_config_rounds_width_up_to_head_dim():
    cfg = build_model_config(depth=20, aspect_ratio=64, head_dim=128, max_seq_len=2048, vocab_size=65536)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len) == (20, 1280, 10, 10, 2048)
    cfg = build_model_config(depth=2, aspect_ratio=40, head_dim=64, max_seq_len=128, vocab_size=512)
    assert (cfg.n_embd, cfg.n_head) == (128, 2)  # 80 rounds up to 128
    assert build_model_config(4, 32, 32, 64, 512, n_kv_head=2).n_kv_head == 2
    with pytest.raises(ValueError, match="--depth"):
        build_model_config(0, 64, 128, 2048, 512)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_param_counts_and_flops_follow_the_architecture():
    cfg = tiny_config(n_kv_head=2)
    model = GPT.create(cfg, "cpu")
    C, L, V, kv = cfg.n_embd, cfg.n_layer, 320, 2 * cfg.head_dim  # vocab padded 300 -> 320
    per_block = C * C + 2 * C * kv + C * C + 8 * C * C  # q, k+v, attention proj, MLP in+out
    assert model.param_counts() == {"wte": V * C, "lm_head": V * C, "transformer_matrices": L * per_block,
                                    "total": 2 * V * C + L * per_block}
    assert model.num_params() == model.num_scaling_params() == 2 * V * C + L * per_block
    attention = 12 * L * cfg.n_head * cfg.head_dim * cfg.sequence_len
    assert model.estimate_flops() == 6 * (V * C + L * per_block) + attention
    logits = model(torch.randint(0, VOCAB, (3, 17)))
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped


# -----------------------------------------------------------------------------
# Initialisation

def test_meta_init_allocates_once_and_matches_cpu_init():
    cfg = tiny_config()
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    storage_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    torch.manual_seed(7)
    model.init_weights()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage_before, "init reallocated"

    reference = GPT(cfg)  # the ordinary way: allocated (and default-initialised) on the CPU
    torch.manual_seed(7)
    reference.init_weights()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    for name in ("cos", "sin"):
        assert torch.equal(getattr(model, name), getattr(reference, name)), name
    # nanochat's scheme: output projections zero, input projections uniform with std 1/sqrt(C)
    block = model.transformer.h[0]
    assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert block.mlp.c_fc.weight.abs().max() <= math.sqrt(3 / cfg.n_embd)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(cfg.n_embd ** -0.5, rel=0.05)


def test_meta_construction_of_a_large_model_allocates_nothing():
    cfg = build_model_config(depth=32, aspect_ratio=64, head_dim=128, max_seq_len=2048, vocab_size=65536)
    with torch.device("meta"):
        model = GPT(cfg)  # ~1.9B parameters: would need >7 GB if materialised
    assert model.num_params() > 1_500_000_000
    assert all(p.is_meta for p in model.parameters())


def test_random_model_loss_is_log_vocab_and_ignores_minus_one():
    torch.manual_seed(0)
    model = GPT.create(tiny_config(), "cpu")
    idx = torch.randint(0, VOCAB, (4, 32))
    targets = torch.randint(0, VOCAB, (4, 32))
    loss = model(idx, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.02)

    model = randomized_model(tiny_config())
    masked = targets.clone()
    masked[:, :10] = -1
    per_token = model(idx, masked, loss_reduction="none")
    assert per_token.shape == (4 * 32,)
    assert torch.all(per_token.view(4, 32)[:, :10] == 0)
    assert model(idx, masked).item() == pytest.approx(per_token.view(4, 32)[:, 10:].mean().item(), rel=1e-5)
    assert model(idx, masked).item() != pytest.approx(model(idx, targets).item(), rel=1e-3)


# -----------------------------------------------------------------------------
# Training

def test_overfits_a_tiny_batch_with_adamw_and_muon():
    torch.manual_seed(0)
    model = GPT.create(tiny_config(), "cpu")
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    assert all("initial_lr" in g for opt in (adamw, muon) for g in opt.param_groups)
    scale = (64 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    covered = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(covered) == len(set(map(id, covered))) == len(list(model.parameters()))

    data = torch.randint(0, VOCAB, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.05)
    assert losses[-1] < 0.5, losses  # from ~5.7: memorised


def test_every_parameter_trains():
    torch.manual_seed(0)
    model = GPT.create(tiny_config(n_layer=2), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = model.setup_optimizers()
    for _ in range(2):  # the zero-initialised projections get a gradient only from step 2 on
        data = torch.randint(0, VOCAB, (2, 17))
        model(data[:, :-1], data[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


# -----------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "gqa"])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    cfg = tiny_config(n_kv_head=n_kv_head)
    model = randomized_model(cfg)
    hd = cfg.head_dim
    seq = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(2, cfg.n_kv_head, 8, hd, cfg.n_layer, device="cpu", dtype=torch.float32)
        pieces = [model(seq[:, :10], kv_cache=cache)]  # prefill
        for t in range(10, 14):  # one token at a time
            pieces.append(model(seq[:, t:t + 1], kv_cache=cache))
        pieces.append(model(seq[:, 14:20], kv_cache=cache))  # a chunk after the prefix (masked attention)
        pieces.append(model(seq[:, 20:24], kv_cache=cache))  # grows the cache past its initial 8 positions
        assert cache.get_pos() == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    # and the test can fail: skipping a token in the cache changes what follows
    cache.reset()
    with torch.no_grad():
        model(seq[:, :9], kv_cache=cache)
        wrong = model(seq[:, 10:11], kv_cache=cache)
    assert not torch.allclose(wrong, full[:, 10:11], atol=1e-3)


def test_kv_cache_prefill_broadcasts_one_prompt_to_several_samples():
    cfg = tiny_config(n_kv_head=2)
    model = randomized_model(cfg, seed=1)
    prompt = torch.randint(0, VOCAB, (1, 12))
    continuations = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        single = KVCache(1, cfg.n_kv_head, 12, cfg.head_dim, cfg.n_layer)
        model(prompt, kv_cache=single)
        batch = KVCache(3, cfg.n_kv_head, 20, cfg.head_dim, cfg.n_layer)
        batch.prefill(single)
        assert batch.get_pos() == 12
        decoded = torch.cat([model(continuations[:, t:t + 1], kv_cache=batch) for t in range(5)], dim=1)
        full = model(torch.cat([prompt.expand(3, -1), continuations], dim=1))[:, 12:]
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match="empty cache"):
        batch.prefill(single)


# -----------------------------------------------------------------------------
# Sampling

def test_generate_greedy_follows_argmax_and_sampling_is_seeded():
    model = randomized_model(tiny_config(), seed=2)
    prompt = [5, 17, 42]
    greedy = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    a = list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=3))
    b = list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=3))
    assert a == b and all(0 <= t < VOCAB for t in a)
    top1 = list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=1, seed=4))
    assert top1 == greedy  # top_k=1 leaves only the argmax


# -----------------------------------------------------------------------------
# Mixed precision

def test_bf16_embedding_outside_autocast_runs_in_float32():
    model = randomized_model(tiny_config(), seed=3)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        reference = model(idx)
        model.transformer.wte.to(dtype=torch.bfloat16)  # what init_weights does on CUDA
        logits = model(idx)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.5, rtol=0.05)  # only the embedding was rounded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_step_and_cached_decoding():
    torch.manual_seed(0)
    model = GPT.create(tiny_config(n_kv_head=2), "cuda")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    optimizers = model.setup_optimizers()
    data = torch.randint(0, VOCAB, (4, 33), device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    cfg = model.config
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(data[:, :20])
        cache = KVCache(4, cfg.n_kv_head, 20, cfg.head_dim, cfg.n_layer, device="cuda", dtype=torch.bfloat16)
        cached = torch.cat([model(data[:, :12], kv_cache=cache)] +
                           [model(data[:, t:t + 1], kv_cache=cache) for t in range(12, 20)], dim=1)
    torch.testing.assert_close(cached, full, atol=0.1, rtol=0.05)
