// Decoder-only transformer LM: token embedding, pre-norm blocks (RMSNorm,
// causal attention with rotary positions and model.kv_heads key/value heads
// shared by groups of heads / kv_heads query heads, FFN), final RMSNorm,
// tied or untied output head. Block i's FFN is an MoE layer when
// (i + 1) % model.moe_every == 0 (so moe_every 1 = every block, 2 = every
// second block), a dense SwiGLU MLP of width model.d_ff otherwise. The dense
// twin (model.dense) makes every block dense with width
// top_k * d_expert + shared_experts * d_expert: the MoE model's active
// parameters per token.
//
// Every parameter is drawn from a generator seeded by (seed, its name), so
// replicated (shared) parameters are identical on every rank and experts are
// identical at any EP size.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

#include "moe/comm/communicator.h"
#include "moe/config/config.h"
#include "moe/moe/moe_layer.h"

namespace moe {

struct ModelCounts {
  int64_t total_params = 0;    // whole model, all experts (global)
  int64_t active_params = 0;   // used per token (top_k experts + shared)
  int64_t expert_params = 0;   // global expert parameters
  double flops_per_token = 0;  // forward, matrix products + attention scores
};

struct LMOutput {
  torch::Tensor logits;            // [B, S, V]
  torch::Tensor aux_loss, z_loss;  // summed over MoE layers
  std::vector<LayerStats> stats;   // one per MoE layer
};

// Keys and values of the positions decoded so far, one entry per block
// ([B, kv_heads, length, head_dim], after rotary): incremental decoding runs
// each new token's attention against them instead of recomputing the prefix.
struct KVCache {
  std::vector<torch::Tensor> k, v;
  int64_t length = 0;  // positions cached
};

struct DenseMlp;
struct Block;

class TransformerLM : public torch::nn::Module {
 public:
  TransformerLM(const Config& cfg, comm::Communicator& ep_group, uint64_t seed);

  // tokens [B, S] int64 in [0, vocab) (any device; moved to the model's).
  // Logits are float32 whatever the compute dtype. With `cache`, tokens sit
  // at positions [cache->length, cache->length + S) after the cached ones
  // (which they attend to) and their keys and values are appended; the total
  // must stay within model.seq_len (the rotary tables' extent).
  LMOutput forward(const torch::Tensor& tokens, bool training, uint64_t noise_seed = 0,
                   KVCache* cache = nullptr);

  // Parameters stay float32 (master weights); bfloat16 computes with
  // bf16 casts of them, so gradients arrive in float32.
  void set_compute_dtype(c10::ScalarType dtype);
  c10::ScalarType compute_dtype() const { return compute_dtype_; }
  // train.recompute: what training forwards keep for backward (see core/recompute.h).
  void set_recompute(Recompute mode);
  // Moves parameters, buffers and the rotary tables.
  void to_device(const torch::Device& device);

  const std::vector<std::shared_ptr<MoELayer>>& moe_layers() const { return moe_layers_; }
  // Parameters sharded by expert (w1/w3/w2 of MoE layers) vs replicated ones, by name.
  std::vector<std::pair<std::string, torch::Tensor>> expert_parameters() const;
  std::vector<std::pair<std::string, torch::Tensor>> shared_parameters() const;
  ModelCounts counts() const;
  const Config& config() const { return cfg_; }

 private:
  Config cfg_;
  torch::Tensor embedding_, head_, final_norm_;
  std::vector<std::shared_ptr<Block>> blocks_;
  std::vector<std::shared_ptr<MoELayer>> moe_layers_;
  torch::Tensor rope_cos_, rope_sin_;
  c10::ScalarType compute_dtype_ = torch::kFloat32;
  Recompute recompute_ = Recompute::None;
};

// softmax(q k^T / sqrt(hd) + causal mask) v for q [B, heads, Sq, hd] and
// k, v [B, heads, q_offset + Sq, hd]: query i sits at position q_offset + i
// and sees keys 0 .. q_offset + i (q_offset > 0: decoding after a KV cache).
// LibTorch's scaled_dot_product_attention (flash / memory-efficient kernels
// on GPU; at::_scaled_dot_product_attention on 1.13), or the explicit
// product (AttentionImpl::Explicit, the reference the tests compare with).
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, AttentionImpl impl, int64_t q_offset = 0);

}  // namespace moe
