"""Hugging Face weights in our transformers: `t5(hf)` and `qwen(hf)` build the from-scratch model
of the same config and copy every weight. tests/test_model.py builds on them to prove the two
implementations equal (logits, greedy decoding, gradients); they also load a released checkpoint."""
import torch

from model import ModelConfig, Qwen, T5


def t5(hf):
    """Build from a Hugging Face T5ForConditionalGeneration, copying its weights."""
    c = hf.config
    if c.feed_forward_proj not in ("relu", "gated-gelu"):
        raise ValueError(f"T5 feed-forward '{c.feed_forward_proj}' is not supported: use relu or gated-gelu")
    # Hugging Face scales the decoder output iff the checkpoint ties its embeddings (T5 v1.0).
    tied = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
    cfg = ModelConfig(arch="t5", vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.num_layers,
                      n_decoder_layers=c.num_decoder_layers, n_heads=c.num_heads, head_dim=c.d_kv,
                      d_ff=c.d_ff, ffn=c.feed_forward_proj, dropout=c.dropout_rate,
                      norm_eps=c.layer_norm_epsilon, rel_buckets=c.relative_attention_num_buckets,
                      rel_max_distance=c.relative_attention_max_distance, tie_embeddings=tied)
    model = T5(cfg)
    sd = hf.state_dict()
    w = {"embed.weight": sd["shared.weight"], "enc_norm.weight": sd["encoder.final_layer_norm.weight"],
         "dec_norm.weight": sd["decoder.final_layer_norm.weight"],
         "enc_bias.emb.weight": sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
         "dec_bias.emb.weight": sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
         "lm_head.weight": sd["lm_head.weight"]}  # when tied, the same tensor as the embedding
    for stack, blocks in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i in range(len(blocks)):
            p, q = f"{stack}.block.{i}.layer.", f"{stack}.{i}."
            a = p + "0.SelfAttention."
            w[q + "norm1.weight"] = sd[p + "0.layer_norm.weight"]
            w[q + "attn.qkv.weight"] = torch.cat([sd[a + n + ".weight"] for n in "qkv"])
            w[q + "attn.o.weight"] = sd[a + "o.weight"]
            if stack == "decoder":
                a = p + "1.EncDecAttention."
                w[q + "norm_x.weight"] = sd[p + "1.layer_norm.weight"]
                w[q + "cross.q.weight"] = sd[a + "q.weight"]
                w[q + "cross.kv.weight"] = torch.cat([sd[a + "k.weight"], sd[a + "v.weight"]])
                w[q + "cross.o.weight"] = sd[a + "o.weight"]
            f = p + ("2" if stack == "decoder" else "1")
            d = f + ".DenseReluDense."
            w[q + "norm2.weight"] = sd[f + ".layer_norm.weight"]
            w[q + "ffn.up.weight"] = (sd[d + "wi.weight"] if cfg.ffn == "relu"
                                      else torch.cat([sd[d + "wi_0.weight"], sd[d + "wi_1.weight"]]))
            w[q + "ffn.down.weight"] = sd[d + "wo.weight"]
    model.load_state_dict(w, strict=True)
    return model


def qwen(hf):
    """Build from a Hugging Face Qwen2ForCausalLM, copying its weights."""
    c = hf.config
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling '{rope['rope_type']}' is not supported: use a checkpoint with default RoPE")
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported: load the checkpoint with use_sliding_window=False")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    sd = hf.state_dict()
    tied = sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    cfg = ModelConfig(arch="qwen", vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                      d_ff=c.intermediate_size, ffn="swiglu", dropout=0.0, norm_eps=c.rms_norm_eps,
                      rope_theta=rope["rope_theta"], qkv_bias=True, tie_embeddings=tied)
    model = Qwen(cfg)
    w = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            w[q + "attn.qkv." + t] = torch.cat([sd[p + f"self_attn.{n}_proj.{t}"] for n in "qkv"])
        w[q + "attn.o.weight"] = sd[p + "self_attn.o_proj.weight"]
        w[q + "norm1.weight"] = sd[p + "input_layernorm.weight"]
        w[q + "norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        w[q + "ffn.up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        w[q + "ffn.down.weight"] = sd[p + "mlp.down_proj.weight"]
    model.load_state_dict(w, strict=True)
    return model
