// The one place LibTorch versions are compared: Debian's 1.13 (CPU, CI) and
// pip CUDA wheels 2.x differ in a few APIs, each guarded with this macro.
#pragma once
#include <torch/version.h>

#define MOE_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||      \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// at::_grouped_mm (bf16 grouped GEMM over int32 offsets, CUDA) from 2.9.
#if MOE_TORCH_AT_LEAST(2, 9) && defined(MOE_TORCH_CUDA) && MOE_TORCH_CUDA
#define MOE_HAVE_GROUPED_MM 1
#else
#define MOE_HAVE_GROUPED_MM 0
#endif
// at::scaled_dot_product_attention (public, flash / memory-efficient on GPU) from 2.0;
// 1.13 has the math kernel as at::_scaled_dot_product_attention.
#define MOE_HAVE_PUBLIC_SDPA MOE_TORCH_AT_LEAST(2, 0)
