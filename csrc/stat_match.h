// Kernel K1, CPU backend: fused channel + patch statistics of a conv/BN input and their closed-form
// backward. See csrc/stat_match.cpp for the algorithm and the layout/precision contract.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace ddfast {

// x: [B, C, H, W] float32/float16/bfloat16/float64 CPU tensor; patch >= 0 (0: no patch statistics).
// Returns (cmean[C], cm2[C], pmean[K], pm2[K]) in float64: means and M2 = sum of squared deviations
// (not divided by the count). The channel pair is always that of x (count B*H*W). The patch pair
// (count B*C*patch^2 each) is that of x' = x when patch divides H and W, else of x' = the bilinear
// resize of x to H' = ceil(H/patch)*patch, W' = ceil(W/patch)*patch (as F.interpolate(mode="bilinear",
// align_corners=False); never materialised); K = (H'/patch)*(W'/patch) patches numbered row-major.
// pmean/pm2 are empty [0] when patch == 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_match_forward(const at::Tensor& x,
                                                                             int64_t patch);

// dx = g_cmean[c]/count_c + g_cvar[c]*2*(x - cmean[c])/count_c
//    + R_hᵀ [g_pmean[k]/count_p + g_pvar[k]*2*(x' - pmean[k])/count_p] R_w   (only if patch > 0)
// per (b, c) plane, with x' = R_h x R_wᵀ and k the patch of x' pixel as in stat_match_forward (R = identity
// when patch divides H and W); pmean/g_pmean/g_pvar have K entries. count_c, count_p are explicit
// (global counts under batch segmentation). dx has x's dtype and x's memory format (contiguous or channels_last; any other layout gives a
// contiguous dx).
at::Tensor stat_match_backward(const at::Tensor& x, const at::Tensor& cmean, const at::Tensor& g_cmean,
                               const at::Tensor& g_cvar, const at::Tensor& pmean,
                               const at::Tensor& g_pmean, const at::Tensor& g_pvar, int64_t patch,
                               double count_c, double count_p);

}  // namespace ddfast
