// Hugging Face Mixtral (MixtralForCausalLM) checkpoints: tensor names,
// config.json, and the rotary layout.
//
// Names (nn.Linear weights are [out, in]; ours are [in, out]):
//   embedding -> model.embed_tokens.weight, head -> lm_head.weight,
//   final_norm -> model.norm.weight, layers.N.{norm1,norm2} ->
//   model.layers.N.{input,post_attention}_layernorm.weight, layers.N.wqkv ->
//   model.layers.N.self_attn.{q,k,v}_proj.weight, layers.N.wo -> o_proj,
//   layers.N.moe.router.weight -> block_sparse_moe.gate.weight,
//   layers.N.moe.experts.E.w{1,2,3} -> block_sparse_moe.experts.E.w{1,2,3}.weight.
//
// Rotary layout: our apply_rope rotates the pairs (2i, 2i+1) of each head by
// angle_i; Hugging Face's rotate_half rotates (i, i + hd/2) by the same
// angle_i. So HF row j of a head's q/k projection is our column perm[j],
// perm = [0, 2, 4, ..., hd-2, 1, 3, ..., hd-1]: q.k is unchanged when q and
// k share one permutation, and v / o are untouched.
#pragma once
#include <torch/types.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "moe/config/config.h"

namespace moe {

// Checkpoint tensors ("param.*" / "buffer.*", experts keyed globally as
// "param.layers.N.moe.experts.E.w1") -> Mixtral names. `rope_head_dim` > 0
// permutes q/k rows of heads of that size to rotate_half order (what
// MixtralForCausalLM computes with); 0 keeps our pair order (a tensor
// exchange that we read back ourselves). Dense-MLP and shared-expert
// tensors get the names Hugging Face's dense models use (mlp.gate_proj ...,
// block_sparse_moe.shared_expert.*): Mixtral itself has neither.
std::map<std::string, torch::Tensor> to_mixtral(const std::map<std::string, torch::Tensor>& ours,
                                                int64_t rope_head_dim);
// The inverse; `source` names the input in errors (CheckpointError for a
// tensor with no counterpart, or a layer missing q, k or v).
std::map<std::string, torch::Tensor> from_mixtral(
    const std::map<std::string, torch::Tensor>& theirs, int64_t rope_head_dim,
    const std::string& source);

// Throws ConfigError naming the first property of `cfg` that Mixtral cannot
// express: dense FFN blocks (model.dense, model.moe_every > 1), shared
// experts, sigmoid scores, group-limited routing, no top-k renormalisation
// (also top_k = 1, whose gate Mixtral renormalises to 1), GELU experts, the
// aux-loss-free balancing bias (it steers selection). Router temperature is
// expressible (folded into the gate weights) and capacity is a training
// device: Mixtral routes dropless.
void check_mixtral_expressible(const Config& cfg);

// config.json of MixtralForCausalLM for `cfg` (float32 weights).
nlohmann::json mixtral_config_json(const Config& cfg);
// The model and moe sections of a config that computes what a Mixtral
// config.json describes (dropless; other sections defaults). ConfigError
// naming the key for what this framework cannot compute (another
// model_type, hidden_act, rope_scaling, a sliding window shorter than the
// context, head_dim != hidden_size / heads).
Config config_from_mixtral_json(const nlohmann::json& j, const std::string& source);

// Export: the checkpoint tensors as Mixtral tensors for `cfg` (checked with
// check_mixtral_expressible; router temperature folded into the gates).
std::map<std::string, torch::Tensor> export_mixtral(
    const std::map<std::string, torch::Tensor>& ours, const Config& cfg);

// Reads a Hugging Face model directory: model.safetensors, or the shards
// named by model.safetensors.index.json (each shard must hold the tensors
// the index assigns to it). CheckpointError naming the file otherwise.
std::map<std::string, torch::Tensor> read_hf_tensors(const std::string& dir);

}  // namespace moe
