"""Parity of the from-scratch transformers with Hugging Face's T5 and Qwen2 (float32, CPU).

Each case builds a small random Hugging Face model (eager attention, the reference math), perturbs
every weight so that a norm left at one or a bias left at zero cannot hide a copying mistake,
copies it with from_hf.py and compares logits, greedy decoding and gradients."""
import dataclasses

import pytest
import torch

import from_hf
from model import KVCache, ModelConfig, build_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # relative error ||ours - hf|| / ||hf|| in float32


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturb(hf, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return hf.eval()


T5_CASES = [  # (config kwargs, encoder padding per row)
    dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4, feed_forward_proj="relu",
         relative_attention_num_buckets=16, relative_attention_max_distance=20, tie_word_embeddings=True),
    dict(d_model=48, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=1, num_heads=3, feed_forward_proj="gated-gelu",
         relative_attention_num_buckets=8, relative_attention_max_distance=12, tie_word_embeddings=False),
    dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=2, num_heads=6, feed_forward_proj="relu",
         relative_attention_num_buckets=32, relative_attention_max_distance=64, tie_word_embeddings=False),
]


def hf_t5(kw, seed):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=97, dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=None, **kw)
    cfg._attn_implementation = "eager"
    return perturb(transformers.T5ForConditionalGeneration(cfg), seed)


def t5_batch(seed, B=3, S=70, T=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 23:] = 0  # padding inside the batch, long enough that distances reach the log buckets
    mask[2, S - 5:] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randint(2, 97, (B, T), generator=g)


@pytest.mark.parametrize("case", range(len(T5_CASES)))
def test_t5_logits_match_hf(case):
    hf = hf_t5(T5_CASES[case], case)
    ours = from_hf.t5(hf).eval()
    ids, mask, dec = t5_batch(case)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = ours(ids, mask, dec)
    assert out.shape == ref.shape == (3, 5, 97)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("case", range(len(T5_CASES)))
def test_t5_greedy_matches_hf(case):
    hf = hf_t5(T5_CASES[case], case)
    ours = from_hf.t5(hf).eval()
    ids, mask, _ = t5_batch(case + 10)
    with torch.no_grad():
        # use_cache=False: Hugging Face sizes the decoder's cache by the encoder's layer count (5.x).
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1,
                          use_cache=False)
        memory, memory_mask = ours.encode(ids, mask)
        dec = torch.zeros(ids.size(0), 1, dtype=torch.long)  # the decoder start token, as in Hugging Face
        for _ in range(6):
            nxt = ours.head(ours.decode(dec, memory, memory_mask))[:, -1].argmax(-1)
            dec = torch.cat([dec, nxt[:, None]], 1)
    assert torch.equal(dec, ref)
    assert dec[:, 1:].unique().numel() >= 4  # a varied sequence, not one token repeated


QWEN_CASES = [  # query heads : kv heads of 2:1, 6:1 (multi-query) and 4:4 (no grouping)
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, num_hidden_layers=3,
         tie_word_embeddings=True, rope_theta=10000.0),
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, intermediate_size=64, num_hidden_layers=2,
         tie_word_embeddings=False, rope_theta=1000000.0),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=5,
         tie_word_embeddings=False, rope_theta=500.0),
]


def hf_qwen(kw, seed):
    torch.manual_seed(seed)
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    cfg = transformers.Qwen2Config(vocab_size=101, rms_norm_eps=1e-6, eos_token_id=None, pad_token_id=0,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)
    cfg._attn_implementation = "eager"
    return perturb(transformers.Qwen2ForCausalLM(cfg), seed)


@pytest.mark.parametrize("case", range(len(QWEN_CASES)))
def test_qwen_logits_match_hf(case):
    hf = hf_qwen(QWEN_CASES[case], case)
    ours = from_hf.qwen(hf).eval()
    assert ours.cfg.tie_embeddings == QWEN_CASES[case]["tie_word_embeddings"]
    g = torch.Generator().manual_seed(case)
    ids = torch.randint(1, 101, (3, 40), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert rel_err(ours(ids), ref) < TOL
        # Padding inside the batch. Right padding: no mask at all (causal attention hides it), as training does.
        right = torch.ones(3, 40, dtype=torch.long)
        right[1, 30:] = 0
        ref = hf(input_ids=ids, attention_mask=right).logits
        out = ours(ids)
        assert rel_err(out[right.bool()], ref[right.bool()]) < TOL
        # Left padding with a mask, as generation does.
        left = right.flip(1)
        ref = hf(input_ids=ids, attention_mask=left).logits
        out = ours(ids, left)
        assert rel_err(out[left.bool()], ref[left.bool()]) < TOL


@pytest.mark.parametrize("case", range(len(QWEN_CASES)))
def test_qwen_greedy_with_cache_matches_hf(case):
    hf = hf_qwen(QWEN_CASES[case], case)
    ours = from_hf.qwen(hf).eval()
    g = torch.Generator().manual_seed(case + 10)
    ids = torch.randint(1, 101, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
        cache = KVCache(ours.cfg.n_layers)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # Hugging Face's positions for left-padded prompts
        h = ours.hidden(ids, mask, position_ids=pos, cache=cache)
        out = ids
        for _ in range(6):
            nxt = ours.head(h[:, -1]).argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            h = ours.hidden(nxt, cache=cache)
    assert torch.equal(out, ref)
    assert out[:, 12:].unique().numel() >= 4


def test_qwen_cache_equals_full_forward():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="qwen", vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=8, d_ff=64, dropout=0.0)).eval()
    ids = torch.randint(1, 50, (2, 10))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(2)
        parts = [m.head(m.hidden(ids[:, :6], cache=cache))]
        parts += [m.head(m.hidden(ids[:, t:t + 1], cache=cache)) for t in range(6, 10)]
    assert rel_err(torch.cat(parts, 1), full) < TOL


@pytest.mark.parametrize("arch,ff", [("t5", {}), ("qwen", {}), ("t5", dict(ff_layers=2, ff_bias=True))])
def test_backward_gives_finite_gradients_everywhere(arch, ff):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=60, d_model=32, n_layers=3, n_decoder_layers=2, n_heads=4,
                      n_kv_heads=2 if arch == "qwen" else 0, head_dim=8, d_ff=64, dropout=0.1, **ff)
    m = build_model(cfg).train()
    ids = torch.randint(1, 60, (4, 20))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    logits = m(ids, mask, ids[:, :4]) if arch == "t5" else m(ids, mask)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, :logits.size(1)].flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'bert': use --arch t5 or --arch qwen"):
        build_model(ModelConfig(arch="bert"))


def test_grid_feed_forward_shape():
    """GRID's mlp_layers 2: d -> d_ff -> d_ff -> d, each with a bias, in every block."""
    m = build_model(ModelConfig(arch="t5", vocab_size=60, d_model=32, d_ff=64, ff_layers=2, ff_bias=True))
    one = build_model(ModelConfig(arch="t5", vocab_size=60, d_model=32, d_ff=64))
    per_block = (64 * 64 + 64) + 64 + 32  # the middle layer, and the biases of up and down
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in one.parameters()) == 8 * per_block
    with pytest.raises(ValueError, match="needs --ffn relu"):
        ModelConfig(arch="qwen", ff_layers=2)


@pytest.mark.parametrize("arch", ["t5", "qwen"])
def test_level_softmax_normalises_over_each_levels_codes(arch):
    """--level-softmax: the loss at code position l is the cross-entropy over column l's tokens alone."""
    from data import Tokens
    torch.manual_seed(0)
    codes, sizes = [[0, 1, 0], [2, 3, 0], [1, 1, 1], [3, 0, 0]], [4, 4, 2]
    tokens = Tokens(codes, sizes)
    cfg = ModelConfig(arch=arch, vocab_size=tokens.vocab_size, code_sizes=sizes, level_softmax=True, d_model=32,
                      n_layers=2, n_decoder_layers=2, n_heads=2, head_dim=16, d_ff=64, dropout=0.0)
    m = build_model(cfg)
    hist, length, target = torch.tensor([[0, 1, -1], [2, 3, 1]]), torch.tensor([2, 3]), torch.tensor([3, 2])
    batch = tokens.t5(hist, target) if arch == "t5" else tokens.qwen(hist, length, target)
    if arch == "t5":
        logits = m(batch["enc"], batch["enc_mask"], batch["dec"])
    else:
        logits = m(batch["ids"]).gather(1, batch["pred_pos"][..., None].expand(-1, -1, cfg.vocab_size))
    want = torch.stack([torch.nn.functional.cross_entropy(
        logits[:, l, tokens.offsets[l]:tokens.offsets[l] + sizes[l]], batch["labels"][:, l] - tokens.offsets[l])
        for l in range(3)]).mean()
    loss, _ = m.loss(batch)
    assert torch.allclose(loss, want, atol=1e-6)
    plain = build_model(dataclasses.replace(cfg, level_softmax=False))
    plain.load_state_dict(m.state_dict())
    assert plain.loss(batch)[0] > loss  # the same weights: the whole vocabulary only adds competitors


def test_torch_init_gives_pytorchs_layer_defaults_and_hf_init_t5s_scaled_normals():
    """GRID resets its Hugging Face T5 to PyTorch's layer defaults (--init torch): projections uniform
    in +-1/sqrt(fan_in), embeddings and the relative bias N(0, 1). Hugging Face's T5 init (--init hf)
    scales each projection by its fan-in instead: q by (d * head_dim)^-1/2, the relative bias by d^-1/2."""
    cfg = dict(arch="t5", vocab_size=600, d_model=64, head_dim=32, n_heads=4, d_ff=512)
    torch.manual_seed(0)
    ours, hf = build_model(ModelConfig(**cfg, init="torch")), build_model(ModelConfig(**cfg))
    qkv, up, down = ours.encoder[0].attn.qkv.weight, ours.encoder[0].ffn.up.weight, ours.encoder[0].ffn.down.weight
    for w, fan_in in ((qkv, 64), (up, 64), (down, 512)):
        assert w.abs().max() <= fan_in ** -0.5 and w.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.05)
    assert ours.enc_bias.emb.weight.std().item() == pytest.approx(1.0, rel=0.3)
    assert ours.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    q = hf.encoder[0].attn.qkv.weight[:4 * 32]
    assert q.std().item() == pytest.approx((64 * 32) ** -0.5, rel=0.05)
    assert hf.enc_bias.emb.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.3)
    qwen = build_model(ModelConfig(arch="qwen", vocab_size=600, d_model=64, init="torch")).blocks[0].attn.qkv
    assert qwen.bias.abs().max() <= 64 ** -0.5 and qwen.bias.std() > 0  # uniform biases, not Qwen2's zeros
    with pytest.raises(ValueError, match="unknown --init 'xavier': use hf"):
        ModelConfig(arch="qwen", init="xavier")
