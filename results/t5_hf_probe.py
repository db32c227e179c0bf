# Reproduces README's "the model" check on a GPU: python results/t5_hf_probe.py (needs transformers and
# the Beauty data under .carry/data). Part (B)'s third run, under the math SDPA kernel, was cut short by an error.
# Does our T5 train like Hugging Face's on real Beauty batches? (A) gradients vs HF on the GPU,
# (B) loss curves of HF vs ours (default SDPA) vs ours (math SDPA), same batches, same optimiser.
import sys, time, math, torch, torch.nn.functional as F
sys.path.insert(0, ".")
from torch.nn.attention import sdpa_kernel, SDPBackend
from transformers import T5Config, T5ForConditionalGeneration
import from_hf
import model as M
from train import parse_args, setup, model_batch
from data import batches, length_buckets
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
cfgs = parse_args(["--arch", "t5", "--data", "beauty", "--data-dir", ".carry/data"])
run = setup(cfgs)
dev, sp = run.device, run.split
mc = cfgs["model"]
hist, length, target = (torch.as_tensor(a, device=dev) for a in (sp.train_hist, sp.train_len, sp.train_target))
buckets = length_buckets(sp.train_len, sp.train_hist.shape[1], 4)
order = batches(sp.train_len, buckets, 256, torch.Generator().manual_seed(0))
order += batches(sp.train_len, buckets, 256, torch.Generator().manual_seed(1))
order += batches(sp.train_len, buckets, 256, torch.Generator().manual_seed(2))
data = [model_batch(run, hist[i.to(dev), :h], length[i.to(dev)], target[i.to(dev)]) for i, h in order]
def hf_model(dropout):
    torch.manual_seed(0)
    c = T5Config(vocab_size=mc.vocab_size, d_model=128, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
                 num_heads=6, dropout_rate=dropout, feed_forward_proj="relu", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, tie_word_embeddings=True, decoder_start_token_id=1, pad_token_id=0)
    return T5ForConditionalGeneration(c).to(dev)
def hf_loss(m, b):
    out = m(input_ids=b["enc"], attention_mask=b["enc_mask"].long(), decoder_input_ids=b["dec"], use_cache=False)
    return F.cross_entropy(out.logits.flatten(0, 1).float(), b["labels"].flatten())
def ours_loss(m, b):
    return m.loss(b)[0]
# (A) gradients, dropout 0, fp32
hf = hf_model(0.0).train()
ours = from_hf.t5(hf).to(dev).train()
b = {k: v[:64] for k, v in data[0].items()}
print("batch", {k: tuple(v.shape) for k, v in b.items()}, "padding", (~b["enc_mask"]).float().mean().item())
def grads(fn, m, ctx=None, dtype=None):
    m.zero_grad()
    with (ctx or torch.enable_grad()), torch.autocast("cuda", dtype or torch.float32, enabled=dtype is not None):
        l = fn(m, b)
    l.backward()
    return l.item(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}
lh, gh = grads(hf_loss, hf)
for name, ctx, dt in [("ours fp32 default", None, None), ("ours fp32 math", sdpa_kernel(SDPBackend.MATH), None),
                      ("ours bf16 default", None, torch.bfloat16)]:
    lo, go = grads(ours_loss, ours, ctx, dt)
    # map: compare the two bias tables, embeddings and the whole flattened gradient norm
    flat = torch.cat([g.flatten() for g in go.values()])
    e = lambda a, b_: ((a - b_).norm() / b_.norm()).item()
    print(f"{name}: loss {lo:.6f} vs hf {lh:.6f}; grad rel err enc_bias "
          f"{e(go['enc_bias.emb.weight'], gh['encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight']):.2e} "
          f"dec_bias {e(go['dec_bias.emb.weight'], gh['decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight']):.2e} "
          f"embed {e(go['embed.weight'], gh['shared.weight']):.2e} "
          f"enc0.qkv {e(go['encoder.0.attn.qkv.weight'][:384], gh['encoder.block.0.layer.0.SelfAttention.q.weight']):.2e}", flush=True)
# (B) training curves
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
def train(name, m, fn, ctx=None, n=len(data)):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    m.train(); t0 = time.time(); acc = []
    for i, bb in enumerate(data[:n]):
        for g in opt.param_groups: g["lr"] = 1e-3 * min(1, (i + 1) / 500)
        with (ctx or torch.enable_grad()), torch.autocast("cuda", torch.bfloat16):
            l = fn(m, bb)
        l.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        acc.append(l.detach())
        if (i + 1) % 256 == 0:
            print(f"{name} step {i + 1}: loss {torch.stack(acc).mean().item():.4f} ({time.time() - t0:.0f} s)", flush=True); acc = []
hf = hf_model(0.15)
ours = from_hf.t5(hf).to(dev)
train("hf", hf, hf_loss)
train("ours", ours, ours_loss)
ours = from_hf.t5(hf_model(0.15)).to(dev)
train("ours-math", ours, ours_loss, sdpa_kernel(SDPBackend.MATH), n=1024)
