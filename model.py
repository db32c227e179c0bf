"""The two transformers of the paper, written from scratch in plain PyTorch.

- `T5`: the encoder-decoder of TIGER/GRID (the paper's encoder-decoder track): bucketed relative
  position bias, unscaled attention logits, pre-norm RMSNorm blocks, cross-attention.
- `Qwen`: the decoder-only model of the paper's Qwen track: RoPE, grouped-query attention,
  SwiGLU, RMSNorm, biases on q/k/v.

Both run their blocks in a plain Python loop with explicit positions and key-padding masks, so
that SAP (sap.py) can drop tokens between two blocks, and both expose their final hidden states
(`T5.decode`, `Qwen.hidden`) for auxiliary heads (map.py). from_hf.py copies a Hugging Face
model of any config into them; tests/test_model.py proves the two equal to Hugging Face's.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import sap
from map import Heads, objective


@dataclass
class ModelConfig:
    arch: str = field(default="t5", metadata={"help": "t5 (encoder-decoder) or qwen (decoder-only)"})
    vocab_size: int = field(default=1030, metadata={"help": "token vocabulary (set from the SID table)"})
    code_sizes: list = field(default_factory=list, metadata={"help": "codes per SID column (set from the SID table)"})
    d_model: int = field(default=128, metadata={"help": "hidden size"})
    n_layers: int = field(default=4, metadata={"help": "encoder blocks (t5) or blocks (qwen)"})
    n_decoder_layers: int = field(default=4, metadata={"help": "decoder blocks (t5 only)"})
    n_heads: int = field(default=6, metadata={"help": "query heads"})
    n_kv_heads: int = field(default=0, metadata={"help": "key/value heads for GQA (qwen); 0 = n_heads"})
    head_dim: int = field(default=64, metadata={"help": "size of one attention head"})
    d_ff: int = field(default=1024, metadata={"help": "feed-forward hidden size"})
    ff_layers: int = field(default=1, metadata={"help": "hidden layers of a relu feed-forward (GRID's mlp_layers: 2)"})
    ff_bias: bool = field(default=False, metadata={"help": "biases in the feed-forward (GRID's multi-layer MLP has them)"})
    ffn: str = field(default="", metadata={"help": "relu | gated-gelu | swiglu; empty = t5: relu, qwen: swiglu"})
    dropout: float = field(default=0.15, metadata={"help": "dropout on embeddings, attention and residual branches"})
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    rel_buckets: int = field(default=32, metadata={"help": "t5 relative-position buckets"})
    rel_max_distance: int = field(default=128, metadata={"help": "t5 distance beyond which positions share a bucket"})
    rope_theta: float = field(default=1e6, metadata={"help": "qwen RoPE base"})
    qkv_bias: bool = field(default=True, metadata={"help": "qwen: biases on the q/k/v projections, as in Qwen2"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the token embedding with the output projection"})
    init: str = field(default="hf", metadata={"help": "weights: hf (Hugging Face's: t5 Mesh TensorFlow's scaled "
                                                       "normals, qwen normal 0.02) or torch (PyTorch's layer defaults, "
                                                       "to which GRID resets its T5)"})
    level_softmax: bool = field(default=False, metadata={"help": "train each code's softmax over its own level's codes "
                                                                 "(GRID's per-level heads), not the whole vocabulary"})
    # SAP (sap.py): prune input tokens after block `prune_layer` of the encoder (t5) or of the stack (qwen)
    keep: float = field(default=1.0, metadata={"help": "SAP retention ratio rho: fraction of input tokens kept (1 = off)"})
    prune_layer: int = field(default=0, metadata={"help": "SAP: prune after this many blocks; 0 = t5: half the encoder, qwen: a quarter"})
    sap_score: str = field(default="attn_l1", metadata={"help": "SAP importance: attn_l1 (the paper), attn, l1, l2, "
                                                                "random or stride"})
    sap_positions: str = field(default="original", metadata={"help": "SAP: kept tokens keep their original positions, "
                                                                      "or compact (re-indexed, as RASTP)"})
    sap_causal_norm: bool = field(default=False, metadata={"help": "SAP, qwen: divide column sums by the queries "
                                                                    "that can see each token"})
    sap_eval: bool = field(default=False, metadata={"help": "SAP: prune at evaluation too (default: training only)"})
    # Set from the data (train.py), like vocab_size: the candidate tokens of the longest history. `keep` is a
    # fraction of it, so what a sample keeps does not depend on the length bucket it is batched in. 0: of each
    # batch's padded length.
    sap_len: int = 0
    # MAP (map.py): auxiliary prediction of the items after the target
    map_steps: int = field(default=0, metadata={"help": "MAP depths D: also predict the D items after the target (0 = off)"})
    map_weight: float = field(default=0.5, metadata={"help": "MAP loss weight lambda"})
    map_head: str = field(default="linear", metadata={"help": "MAP head: linear (a projection) or block (and one block)"})
    map_kind: str = field(default="parallel", metadata={"help": "MAP heads read the main state (parallel) or the "
                                                                "previous depth's (sequential, DeepSeek-V3)"})

    def __post_init__(self):
        self.ffn = self.ffn or ("relu" if self.arch == "t5" else "swiglu")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.prune_layer = self.prune_layer or max(1, self.n_layers // (2 if self.arch == "t5" else 4))
        if self.arch not in ("t5", "qwen"):
            raise ValueError(f"unknown architecture '{self.arch}': use --arch t5 or --arch qwen")
        if min(self.d_model, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff, self.ff_layers) < 1 or (
                self.arch == "t5" and self.n_decoder_layers < 1):
            raise ValueError("--d-model, --n-layers, --n-decoder-layers, --n-heads, --head-dim, --d-ff and --ff-layers "
                             "must be at least 1")
        if self.ff_layers > 1 and self.ffn != "relu":
            raise ValueError(f"--ff-layers {self.ff_layers} needs --ffn relu (GRID's MLP), not {self.ffn}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"--n-heads {self.n_heads} is not a multiple of --n-kv-heads {self.n_kv_heads}: each kv head "
                             "serves a whole group of query heads (e.g. 6 and 2)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout {self.dropout} is outside [0, 1): it is the probability of zeroing an activation")
        if not 0 < self.keep <= 1:
            raise ValueError(f"--keep {self.keep} is outside (0, 1]: it is the fraction of input tokens SAP keeps "
                             "(1 = no pruning)")
        if self.keep < 1 and not 1 <= self.prune_layer < self.n_layers:
            raise ValueError(f"--prune-layer {self.prune_layer} is outside the model's {self.n_layers} blocks: use 1 to "
                             f"{self.n_layers - 1} (SAP prunes after that many blocks)")
        if self.sap_score not in sap.SCORES:
            raise ValueError(f"unknown --sap-score '{self.sap_score}': use one of {', '.join(sap.SCORES)}")
        if self.init not in ("hf", "torch"):
            raise ValueError(f"unknown --init '{self.init}': use hf (Hugging Face's) or torch (PyTorch's layer defaults)")
        if self.sap_positions not in ("original", "compact"):
            raise ValueError(f"unknown --sap-positions '{self.sap_positions}': use original or compact")
        if self.map_steps < 0:
            raise ValueError(f"--map-steps {self.map_steps} is negative: use 0 (off) or the number of future items to predict")
        if self.map_head not in ("linear", "block") or self.map_kind not in ("parallel", "sequential"):
            raise ValueError(f"unknown MAP head '{self.map_head}' or kind '{self.map_kind}': use --map-head linear|block "
                             "and --map-kind parallel|sequential")


# ---------------------------------------------------------------------------------------------
# Shared parts


class RMSNorm(nn.Module):
    """Scale by the root mean square, no mean, no bias (T5's "layer norm" and Qwen2's RMSNorm).
    Statistics in float32 as both references do: bf16 sums of squares lose precision."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).type_as(x)


class FeedForward(nn.Module):
    """relu: down(relu(up x)) as in T5; gated-gelu (T5 v1.1) and swiglu (Qwen): down(act(gate x) * up x).
    Gate and up are one matrix product (one launch), split afterwards."""

    def __init__(self, d_model, d_ff, kind, dropout, bias=False, layers=1):
        super().__init__()
        if kind not in ("relu", "gated-gelu", "swiglu"):
            raise ValueError(f"unknown feed-forward '{kind}': use relu, gated-gelu or swiglu")
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff * (1 if kind == "relu" else 2), bias=bias)
        self.mid = nn.ModuleList(nn.Linear(d_ff, d_ff, bias=bias) for _ in range(layers - 1))  # GRID's deeper MLP
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "relu":
            h = F.relu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu if self.kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
            h = act(gate) * up
        for layer in self.mid:
            h = F.relu(layer(self.drop(h)))
        return self.down(self.drop(h))


def rotate(x, cos, sin):
    """RoPE in the rotate-half layout of Hugging Face and Qwen: pairs (i, i + d/2) turn by pos * freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (the fused kernels).

    Self-attention projects q, k, v with one matrix product; cross-attention (t5 decoder) projects
    q from the decoder and k, v from the encoder output. `mask` is a boolean (True = may attend)
    or additive float mask broadcastable to (B, H, T, S); `causal` without a mask takes the
    flash kernel. Fewer kv heads than query heads is grouped-query attention (Qwen2)."""

    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, scale, dropout, bias=False, cross=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.dropout, self.cross = scale, dropout, cross
        kv_dim = 2 * n_kv_heads * head_dim
        if cross:
            self.q = nn.Linear(d_model, n_heads * head_dim, bias=bias)
            self.kv = nn.Linear(d_model, kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(d_model, n_heads * head_dim + kv_dim, bias=bias)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x, mask=None, causal=False, rope=None, memory=None, cache=None, colsum_valid=None):
        """colsum_valid: (B, T) real queries; when given, also return SAP's column sums (B, S)."""
        if self.cross:
            q, kv = self.q(x), self.kv(memory)
        else:
            q, kv = self.qkv(x).split([self.n_heads * self.head_dim, 2 * self.n_kv_heads * self.head_dim], -1)
        q = rearrange(q, "b t (h d) -> b h t d", d=self.head_dim)
        k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, d=self.head_dim)
        if rope is not None:
            cos, sin = (r.to(q.dtype) for r in rope)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # SDPA wants an additive mask in the dtype of q (bf16 under autocast)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads)
        y = self.o(rearrange(y, "b h t d -> b t (h d)"))
        if colsum_valid is None:
            return y
        return y, sap.column_sums(q, k, self.scale, mask, causal, colsum_valid)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross(norm(x))] + ffn(norm(x)), dropout on each branch."""

    def __init__(self, cfg, scale, cross=False):
        super().__init__()
        qwen = cfg.arch == "qwen"
        attn = lambda is_cross: Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, scale,
                                          0.0 if qwen else cfg.dropout, bias=qwen and cfg.qkv_bias, cross=is_cross)
        self.norm1, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), attn(False)
        if cross:
            self.norm_x, self.cross = RMSNorm(cfg.d_model, cfg.norm_eps), attn(True)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.ffn, cfg.dropout, cfg.ff_bias, cfg.ff_layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, causal=False, rope=None, memory=None, memory_mask=None, cache=None,
                colsum_valid=None):
        """With colsum_valid (B, T), also return the self-attention's column sums (SAP)."""
        a = self.attn(self.norm1(x), mask, causal, rope, cache=cache, colsum_valid=colsum_valid)
        a, colsum = a if colsum_valid is not None else (a, None)
        x = x + self.drop(a)
        if memory is not None:
            x = x + self.drop(self.cross(self.norm_x(x), memory_mask, memory=memory))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x if colsum_valid is None else (x, colsum)


def torch_defaults(model):
    """PyTorch's own layer initialisation: projections uniform in +-1/sqrt(fan_in), embeddings (the relative
    bias too) N(0, 1). GRID builds a Hugging Face T5 and then resets every layer to these."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.reset_parameters()


NEG = -1e9  # additive mask value: finite, so a fully masked row gives uniform weights, never NaN


# ---------------------------------------------------------------------------------------------
# T5


def relative_bucket(rel, bidirectional, n_buckets, max_distance):
    """T5's bucketing of key_pos - query_pos: exact buckets for small distances, logarithmic ones
    up to max_distance, one bucket beyond. Bidirectional stacks split the buckets by sign; causal
    stacks only see keys at or before the query (rel <= 0)."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    log_bucket = exact + (torch.log(dist.clamp(min=1).float() / exact)
                          / math.log(max_distance / exact) * (n_buckets - exact)).long()
    return bucket + torch.where(dist < exact, dist, log_bucket.clamp(max=n_buckets - 1))


class RelativeBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention logits of every layer of a
    stack (T5 computes it once per stack). Built from explicit positions, so that tokens kept by
    SAP keep their original distances."""

    def __init__(self, cfg, bidirectional):
        super().__init__()
        self.bidirectional, self.n_buckets, self.max_distance = bidirectional, cfg.rel_buckets, cfg.rel_max_distance
        self.emb = nn.Embedding(cfg.rel_buckets, cfg.n_heads)

    def forward(self, q_pos, k_pos):  # (b, T), (b, S) -> (b, H, T, S)
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        bias = self.emb(relative_bucket(rel, self.bidirectional, self.n_buckets, self.max_distance))
        # Contiguous: the fused SDPA kernels need a mask whose last dimension has stride 1; the
        # permuted view has stride H there and would send every layer to the slow math path.
        return bias.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def select(full, pos):
        """The bias among the tokens at positions pos (B, k), read from the bias over all positions
        full (1, H, S, S): equal to forward(pos, pos), but its backward adds into S x S entries
        rather than piling B * k * k terms onto the 32 buckets. SAP's T5 step at keep 0.33 on the
        H100: 8.68 -> 7.62 ms (1.25x -> 1.41x the unpruned step, README)."""
        return full[0].permute(1, 2, 0)[pos[:, :, None], pos[:, None, :]].permute(0, 3, 1, 2).contiguous()


class T5(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.enc_bias, self.dec_bias = RelativeBias(cfg, True), RelativeBias(cfg, False)
        # T5 does not scale q.k by 1/sqrt(d): its initialisation folds that into the q projection.
        self.encoder = nn.ModuleList(Block(cfg, 1.0) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(Block(cfg, 1.0, cross=True) for _ in range(cfg.n_decoder_layers))
        self.enc_norm, self.dec_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.map = map_heads(cfg)

    @torch.no_grad()
    def reset_parameters(self):
        """--init hf: T5's initialisation (Mesh TensorFlow): unit-variance embeddings, each projection
        scaled by its fan-in; q also carries the 1/sqrt(head_dim) the logits lack. --init torch: GRID's."""
        if self.cfg.init == "torch":
            return torch_defaults(self)
        d, hd, H = self.cfg.d_model, self.cfg.head_dim, self.cfg.n_heads
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=d ** -0.5)
        for bias in (self.enc_bias, self.dec_bias):
            nn.init.normal_(bias.emb.weight, std=d ** -0.5)
        for block in [*self.encoder, *self.decoder]:
            for attn in [block.attn] + ([block.cross] if hasattr(block, "cross") else []):
                q = attn.q.weight if attn.cross else attn.qkv.weight[:H * hd]
                kv = attn.kv.weight if attn.cross else attn.qkv.weight[H * hd:]
                nn.init.normal_(q, std=(d * hd) ** -0.5)
                nn.init.normal_(kv, std=d ** -0.5)
                nn.init.normal_(attn.o.weight, std=(H * hd) ** -0.5)
            nn.init.normal_(block.ffn.up.weight, std=d ** -0.5)
            for w in [layer.weight for layer in block.ffn.mid] + [block.ffn.down.weight]:
                nn.init.normal_(w, std=self.cfg.d_ff ** -0.5)

    def encode(self, input_ids, attention_mask=None):
        """(B, S) tokens -> encoder output (B, S', D) and its key mask (B, S'). S' = S unless SAP
        drops tokens after block `prune_layer`; the decoder's cross-attention then uses the pruned mask."""
        S = input_ids.size(1)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(S, device=input_ids.device)[None]  # (1, S): shared by the batch
        x = self.drop(self.embed(input_ids))
        full = self.enc_bias(pos, pos)
        bias = full + key_mask(mask)  # (B, H, S, S), shared by the encoder blocks
        prune = self.cfg.keep < 1 and (self.training or self.cfg.sap_eval)
        for i, block in enumerate(self.encoder):
            if prune and i + 1 == self.cfg.prune_layer and sap.prunes(self.cfg, x.size(1), 0):
                x, colsum = block(x, bias, colsum_valid=mask)
                _, x, pos, mask = sap.prune(self.cfg, x, colsum, sap.prior_from_mask(mask), 0, pos, mask)
                bias = RelativeBias.select(full, pos) + key_mask(mask)  # kept tokens keep their distances
            else:
                x = block(x, bias)
        return self.drop(self.enc_norm(x)), mask

    def decode(self, decoder_input_ids, memory, memory_mask):
        """Final decoder hidden states (B, T, D), before the output projection."""
        T = decoder_input_ids.size(1)
        pos = torch.arange(T, device=decoder_input_ids.device)[None]
        causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
        bias = self.dec_bias(pos, pos).masked_fill(~causal, NEG)
        x = self.drop(self.embed(decoder_input_ids))
        cross_mask = key_mask(memory_mask)
        for block in self.decoder:
            x = block(x, bias, memory=memory, memory_mask=cross_mask)
        return self.drop(self.dec_norm(x))

    def head(self, h):
        # Tied T5 rescales by 1/sqrt(d_model) before the shared projection (the embeddings have unit variance).
        return self.lm_head(h * self.cfg.d_model ** -0.5 if self.cfg.tie_embeddings else h)

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        """(B, S) encoder tokens, (B, S) mask, (B, T) decoder tokens -> logits (B, T, V)."""
        memory, memory_mask = self.encode(input_ids, attention_mask)
        return self.head(self.decode(decoder_input_ids, memory, memory_mask))

    def loss(self, batch):
        """Next-SID loss: the decoder reads (start, c1 .. c_{L-1}) and predicts (c1 .. cL)."""
        memory, memory_mask = self.encode(batch["enc"], batch["enc_mask"])
        return objective(self, self.decode(batch["dec"], memory, memory_mask), batch)


def key_mask(mask):
    """(B, S) bool, True = real token -> additive (B, 1, 1, S) mask for SDPA."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, NEG)[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Qwen


class KVCache:
    """Keys, values, positions and validity of every layer, for incremental decoding (beam search).
    Decoding a semantic ID takes a handful of steps, so it grows by concatenation."""

    def __init__(self, n_layers):
        self.layers = [KVCache.Layer() for _ in range(n_layers)]

    class Layer:
        k = v = pos = valid = None

        def append(self, k, v):  # called by the layer's attention
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

        def extend(self, pos, valid):  # called by the stack: the key positions the layer will see
            self.pos = pos if self.pos is None else torch.cat([self.pos, pos], dim=1)
            self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)
            return self.pos, self.valid

    def reorder(self, index):
        """Keep the rows in `index` (beam search: each surviving beam takes its parent's history)."""
        for layer in self.layers:
            layer.k, layer.v, layer.pos, layer.valid = (t[index] for t in (layer.k, layer.v, layer.pos, layer.valid))

    def next_pos(self, i=0):  # (B, 1): the position after the last token layer i has seen
        return self.layers[i].pos[:, -1:] + 1


class Qwen(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, cfg.head_dim ** -0.5) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.map = map_heads(cfg)

    @torch.no_grad()
    def reset_parameters(self):
        """--init hf: Qwen2's initialisation, normal(0, 0.02) weights and zero biases; --init torch: PyTorch's."""
        if self.cfg.init == "torch":
            return torch_defaults(self)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def rope(self, pos):  # (b, T) positions -> cos, sin (b, 1, T, head_dim), in float32
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, prior=None, fixed=0, at=None):
        """Final hidden states (B, T, D), or (B, n, D) at the original positions `at` (B, n).

        Without a padding mask or a cache, attention is plainly causal (the flash kernel):
        right-padded batches need no mask, since under a causal mask no real token sees the padding
        after it. With a mask or a cache, token i attends to the valid keys at positions <= its own.
        SAP (training, or evaluation with sap_eval; never on decoding steps) keeps the `fixed` tokens
        whose prior is +inf (separator, target) and the best of the candidates (prior 0)."""
        B, T = input_ids.shape
        prefill = cache is None or cache.layers[0].pos is None
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None] + (0 if prefill else cache.next_pos())
        pos = position_ids.expand(B, T)
        valid = None if attention_mask is None else attention_mask.bool()
        if valid is None and cache is not None:  # the cache keeps key validity for later steps
            valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        prune = self.cfg.keep < 1 and (self.training or self.cfg.sap_eval)
        if prune and prior is None:  # every real token a candidate
            prior = sap.prior_from_mask(valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool))
        index = None  # the original index of each token, once SAP has dropped some
        x, rope = self.embed(input_ids), self.rope(pos)
        for i, block in enumerate(self.blocks):
            layer = cache.layers[i] if cache is not None else None
            if i == self.cfg.prune_layer and layer is not None and not prefill and self.cfg.keep < 1 and self.cfg.sap_eval:
                pos = cache.next_pos(i) + torch.arange(T, device=pos.device)  # this layer cached only kept tokens
                rope = self.rope(pos)
            mask = None
            if valid is not None:
                mask = causal_mask(pos, *(layer.extend(pos, valid) if layer is not None else (pos, valid)))
            if prune and prefill and i + 1 == self.cfg.prune_layer and sap.prunes(self.cfg, T, fixed):
                x, colsum = block(x, mask, causal=True, rope=rope, cache=layer, colsum_valid=prior > -math.inf)
                index, x, pos, prior, *rest = sap.prune(self.cfg, x, colsum, prior, fixed, pos, prior,
                                                        *([valid] if valid is not None else []))
                valid = rest[0] if rest else None
                rope = self.rope(pos)
            else:
                x = block(x, mask, causal=True, rope=rope, cache=layer)
        h = self.norm(x)
        if at is None:
            return h
        if index is not None:  # kept indices are ascending: find where each wanted position went
            at = torch.searchsorted(index, at)
        return h.gather(1, at[..., None].expand(-1, -1, h.size(-1)))

    def head(self, h):
        return self.lm_head(h)

    def forward(self, input_ids, attention_mask=None):
        """(B, T) tokens [, (B, T) mask] -> logits (B, T, V)."""
        return self.head(self.hidden(input_ids, attention_mask))

    def loss(self, batch):
        """Next-SID loss on the target only: the states at `pred_pos` (the separator and the first
        L-1 target tokens, (B, L)) predict the L target codes. Batches are right-padded, so no mask."""
        L = batch["labels"].size(1)
        h = self.hidden(batch["ids"], prior=batch.get("prior"), fixed=L + 1, at=batch["pred_pos"])  # (B, L, D)
        return objective(self, h, batch)


def causal_mask(pos, k_pos, k_valid):
    """(B, T) query positions, (B, S) key positions and validity -> boolean (B, 1, T, S) mask:
    query i may see key j iff j is valid and pos_j <= pos_i. The last T keys are the queries
    themselves (with a cache, the cached keys come first); every query sees itself, so a padding
    row never has an empty softmax."""
    T, S = pos.size(1), k_pos.size(1)
    mask = k_valid[:, None, :] & (k_pos[:, None, :] <= pos[:, :, None])
    mask[:, :, S - T:] |= torch.eye(T, dtype=torch.bool, device=pos.device)
    return mask[:, None]


def map_heads(cfg):
    """MAP's auxiliary heads (map.py), or None: they share the model's embeddings and output projection."""
    if not cfg.map_steps:
        return None
    return Heads(cfg, lambda: Block(cfg, cfg.head_dim ** -0.5), lambda: RMSNorm(cfg.d_model, cfg.norm_eps))


def build_model(cfg):
    return (T5 if cfg.arch == "t5" else Qwen)(cfg)
