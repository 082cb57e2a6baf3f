#!/usr/bin/python3
"""Independent reference for `moe ckpt export --hf`: MixtralForCausalLM's
forward written in plain torch from Hugging Face's modeling_mixtral
conventions (transformers itself is not needed), run on an exported
directory, compared with the logits our model computed.

    hf_mixtral_reference.py HF_DIR DUMP.safetensors [--tol 1e-4]

HF_DIR: config.json + model.safetensors (or model.safetensors.index.json and
shards). DUMP: "tokens" int64 [B, S] and "logits" float32 [B, S, V] from our
model. Prints max_abs_diff=...; exit 0 when it is <= tol, 1 otherwise.

Conventions (modeling_mixtral.py): RMSNorm in float32, weight * normalised;
rotary embeddings with rotate_half (pairs (i, i + head_dim/2)), inv_freq =
1 / theta^(2i/head_dim); grouped-query attention through repeat_kv (query
head h reads key/value head h // (heads / kv_heads)); causal softmax of
q k^T / sqrt(head_dim); router softmax over all experts, top-k,
renormalised to sum to 1; experts w2(silu(w1 x) * w3 x); lm_head, tied to
embed_tokens when tie_word_embeddings is true.
"""
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16,
          "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
          "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        if end > begin:
            flat = torch.frombuffer(bytearray(data[8 + n + begin:8 + n + end]), dtype=dtype)
        else:
            flat = torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(entry["shape"])
    return out


def read_model_dir(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(read_safetensors(os.path.join(path, shard)))
    else:
        weights = read_safetensors(os.path.join(path, "model.safetensors"))
    return config, {k: v.float() for k, v in weights.items()}


def rms_norm(x, weight, eps):
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(head_dim, seq, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def repeat_kv(x, n_rep):
    b, kv, s, hd = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, hd).reshape(b, kv * n_rep, s, hd)


def attention(x, w, cfg, layer, cos, sin):
    b, s, d = x.shape
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or d // heads
    pre = f"model.layers.{layer}.self_attn."
    q = F.linear(x, w[pre + "q_proj.weight"]).view(b, s, heads, hd).transpose(1, 2)
    k = F.linear(x, w[pre + "k_proj.weight"]).view(b, s, kv, hd).transpose(1, 2)
    v = F.linear(x, w[pre + "v_proj.weight"]).view(b, s, kv, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = repeat_kv(k, heads // kv), repeat_kv(v, heads // kv)
    scores = torch.matmul(q, k.transpose(2, 3)) / (hd ** 0.5)
    mask = torch.full((s, s), float("-inf")).triu(1)
    probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, heads * hd)
    return F.linear(out, w[pre + "o_proj.weight"])


def sparse_moe(x, w, cfg, layer):
    b, s, d = x.shape
    h = x.view(-1, d)
    pre = f"model.layers.{layer}.block_sparse_moe."
    router_logits = F.linear(h, w[pre + "gate.weight"])
    weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, chosen = torch.topk(weights, cfg["num_experts_per_tok"], dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(h)
    for e in range(cfg["num_local_experts"]):
        rows, slot = torch.where(chosen == e)
        if rows.numel() == 0:
            continue
        cur = h[rows]
        ex = pre + f"experts.{e}."
        y = F.linear(F.silu(F.linear(cur, w[ex + "w1.weight"])) * F.linear(cur, w[ex + "w3.weight"]),
                     w[ex + "w2.weight"])
        out.index_add_(0, rows, y * weights[rows, slot, None])
    return out.view(b, s, d)


def mixtral_logits(cfg, w, tokens):
    assert cfg["model_type"] == "mixtral" and cfg.get("hidden_act", "silu") == "silu"
    eps = cfg["rms_norm_eps"]
    d = cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    cos, sin = rotary_tables(hd, tokens.shape[1], cfg.get("rope_theta", 1e6))
    x = F.embedding(tokens, w["model.embed_tokens.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        x = x + attention(rms_norm(x, w[pre + "input_layernorm.weight"], eps), w, cfg, layer, cos, sin)
        x = x + sparse_moe(rms_norm(x, w[pre + "post_attention_layernorm.weight"], eps), w, cfg, layer)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return F.linear(x, head)


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    tol = float(argv[argv.index("--tol") + 1]) if "--tol" in argv else 1e-4
    cfg, weights = read_model_dir(argv[1])
    dump = read_safetensors(argv[2])
    with torch.no_grad():
        ref = mixtral_logits(cfg, weights, dump["tokens"].long())
    ours = dump["logits"].float()
    if ref.shape != ours.shape:
        print(f"shape mismatch: reference {list(ref.shape)}, ours {list(ours.shape)}")
        return 1
    diff = (ref - ours).abs().max().item()
    print(f"max_abs_diff={diff:.3e} max_abs_logit={ref.abs().max().item():.3e} "
          f"tokens={list(dump['tokens'].shape)} tol={tol:g}")
    return 0 if diff <= tol else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
