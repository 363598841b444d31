// The sloth operator library: every schema is declared here, once.
//
// Backends register kernels with TORCH_LIBRARY_IMPL in csrc/cpu, csrc/cuda and csrc/hip;
// python/sloth/ops adds argument checks, fake (meta) kernels and autograd.
#include <torch/library.h>

#include <Python.h>

TORCH_LIBRARY(sloth, m) {
  // NF4 (bitsandbytes layout). packed: [(numel + 1) / 2, 1] uint8, absmax: [ceil(numel / blocksize)] fp32.
  m.def("nf4_quantize(Tensor x, int blocksize) -> (Tensor packed, Tensor absmax)");
  // absmax is fp32 [blocks], or uint8 [blocks] with code2 [256] fp32, absmax2 [ceil(blocks / blocksize2)]
  // fp32 and offset [] fp32 (double quantization).
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int[] shape, int blocksize, ScalarType dtype, "
      "Tensor? code2=None, Tensor? absmax2=None, Tensor? offset=None, int blocksize2=256) -> Tensor");
  // Blockwise 8-bit quantization against a sorted 256-entry code (bitsandbytes' dynamic map):
  // q: uint8 shaped like x, absmax: [ceil(numel / blocksize)] fp32.
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  // MXFP4 (OCP MX, gpt-oss layout). x: [..., K], K % 32 == 0 -> blocks [..., K / 32, 16] uint8,
  // scales [..., K / 32] uint8 (E8M0).
  m.def("mxfp4_quantize(Tensor x) -> (Tensor blocks, Tensor scales)");
  // blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] of dtype (not transposed).
  m.def("mxfp4_dequantize(Tensor blocks, Tensor scales, ScalarType dtype) -> Tensor");

  // Chunked linear cross-entropy (python/sloth/nn/linear_cross_entropy.py). One chunk of raw logits
  // x = h W^T (+ b), [rows, V] fp32/fp16/bf16 contiguous; z = logit_scale * x, or
  // softcap * tanh(logit_scale * x / softcap) when softcap > 0. Per row, in fp32:
  //   loss = lse(z) - z[label] (0 where label == ignore_index, NaN where label is outside [0, V)),
  //   lse = log sum exp z, entropy = lse - sum softmax(z) * z  (all [rows] fp32).
  // With compute_grad, logits are overwritten IN PLACE by d/dx of
  //   c_nll * loss + c_ent * entropy,  c_nll = grad_scale * grad_nll[row] (1 when None),
  //   c_ent = grad_scale * grad_entropy[row] (0 when None), both 0 on ignored rows; a row whose label is outside
  //   [0, V) (and not ignore_index) gets a NaN gradient.
  m.def(
      "cross_entropy_chunk(Tensor(a!) logits, Tensor labels, Tensor? grad_nll, Tensor? grad_entropy, "
      "float grad_scale, int ignore_index, float softcap, float logit_scale, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor entropy)");

  // Online linear cross-entropy for a frozen head (python/sloth/nn/_online_head.py): the logits of a row
  // chunk arrive in vocabulary blocks [rows, vb] starting at column vocab_start; nothing of size [rows, V]
  // exists. ce_online_block overwrites a block IN PLACE by p' = exp(z - m) dz/dx and updates state [rows, 4]
  // fp32 = (m, s = sum exp(z - m), z_label, dz/dx_label) (vocab_start == 0 initializes it); where m moves, it
  // rescales acc [rows, H] fp32, into which the caller then adds p' @ W_block. m moves only when a block's
  // max exceeds it by more than `margin` (p' <= e^margin dz/dx).
  m.def(
      "ce_online_block(Tensor(a!) logits, Tensor labels, int vocab_start, Tensor(b!) state, Tensor(c!) acc, "
      "float softcap, float logit_scale, float margin) -> ()");
  // After the last block (a row with a label outside [0, V) gets NaN in loss and dh):
  // loss [rows] fp32 = m + log s - z_label (0 where label == ignore_index, NaN outside
  // [0, V)) and, written into dh [rows, H] (weight's dtype), d loss / d h = c (acc / s - dz/dx_label W[label])
  // with c = row_scale[row] (1 when None), 0 on ignored rows.
  m.def(
      "ce_online_finish(Tensor state, Tensor acc, Tensor weight, Tensor labels, Tensor? row_scale, int ignore_index, "
      "Tensor(a!) dh) -> Tensor");

  // ---- QLoRA linear and fused GLU activations (python/sloth/nn/lora_linear.py, python/sloth/ops/glu.py) ----
  // nf4_dequantize into a preallocated contiguous `out` (any shape with the quantized numel; its dtype is
  // the output dtype): the large-M QLoRA path dequantizes into a reusable workspace with it.
  m.def(
      "nf4_dequantize_out(Tensor packed, Tensor absmax, int blocksize, Tensor? code2, Tensor? absmax2, "
      "Tensor? offset, int blocksize2, Tensor(a!) out) -> ()");
  // Small-M fused QLoRA GEMV: x [M, K] (M <= 16, bf16/fp16), packed NF4 weight W [N, K] ->
  // y [M, N] = x W^T + scaling * lora_t B^T + bias, with lora_t = x A^T [M, r], lora_B [N, r], bias [N].
  m.def(
      "nf4_gemv_lora(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, Tensor? code2, "
      "Tensor? absmax2, Tensor? offset, int blocksize2, Tensor? lora_t, Tensor? lora_B, float scaling, "
      "Tensor? bias) -> Tensor");
  // GLU activations, kind: 0 SwiGLU silu(gate) * up, 1 GeGLU gelu_tanh(gate) * up, 2 GeGLU gelu_erf(gate) * up.
  m.def("glu_forward(Tensor gate, Tensor up, int kind) -> Tensor");
  // In place: gate <- d_gate = grad * up * act'(gate), up <- d_up = grad * act(gate) (same shape and dtype).
  m.def("glu_backward(Tensor grad, Tensor(a!) gate, Tensor(b!) up, int kind) -> ()");
  // ---- MoE experts (python/sloth/ops/moe.py, python/sloth/reference/moe.py) ----
  // logits [T, E] -> weights [T, k] fp32, ids [T, k] int64; kind 0 softmax then top-k (Qwen3-MoE, optional
  // renormalization), kind 1 top-k then softmax (gpt-oss); ties go to the lower expert index.
  m.def("moe_route(Tensor logits, int top_k, int kind, bool renormalize) -> (Tensor weights, Tensor ids)");
  // ids [T, k] -> stable counting sort of the T * k slots by expert: sorted_slots [R], slot_pos [R] (its
  // inverse), offsets [E + 1], all int32.
  m.def("moe_permute(Tensor ids, int num_experts) -> (Tensor sorted_slots, Tensor slot_pos, Tensor offsets)");
  // Grouped GEMM over an expert stack stored [E, A, B]: fmt 0 dense (w [E, A, B]), 1 NF4 (w packed uint8,
  // scale = absmax, optional code2 / absmax2 / dq_offset [] or [E]), 2 MXFP4 (w blocks [E, A, B / 32, 16],
  // scale = scales [E, A, B / 32]). Row r (x[rows[r]] when rows is given) of expert e's offset range:
  //   pre = x_r W_e^T (trans: x_r W_e) + bias[e] + scaling * lora_t[r] lora_B[e]^T, out = glu(pre)
  // glu 0 none, 1 SwiGLU [gate; up], 2 SwiGLU interleaved, 3 gpt-oss clamped interleaved, 4 clamped [gate; up].
  // Returns out [R, out or out / 2] (x's dtype) and pre [R, out] when glu and return_pre, else [0, out].
  m.def(
      "moe_grouped_gemm(Tensor x, Tensor? rows, Tensor offsets, int fmt, Tensor w, Tensor? scale, Tensor? code2, "
      "Tensor? absmax2, Tensor? dq_offset, int[] wshape, int blocksize, int blocksize2, bool trans, Tensor? bias, "
      "Tensor? lora_t, Tensor? lora_B, float scaling, int glu, float alpha, float limit, bool return_pre) "
      "-> (Tensor out, Tensor pre)");
  // dpre [R, 2I] (pre's dtype) of out = glu(pre) given dout [R, I].
  m.def("moe_glu_backward(Tensor dout, Tensor pre, int glu, float alpha, float limit) -> Tensor");
  // out [T, H] = sum_j weights[t, j] * y[slot_pos[t * k + j]] (weights None: plain sum), y's dtype.
  m.def("moe_combine(Tensor y, Tensor slot_pos, Tensor? weights, int top_k) -> Tensor");
  // dy [R, H] = weights[s] * dout[s / k] for s = sorted_slots[r]; dweights [T, k] fp32 = <dout[t], y[slot_pos]>.
  m.def("moe_combine_backward(Tensor dout, Tensor y, Tensor sorted_slots, Tensor slot_pos, Tensor weights) "
        "-> (Tensor dy, Tensor dweights)");
  // ---- end MoE ----
  // ---- RMSNorm and RoPE (python/sloth/ops/norm_rope.py) ----
  // x [rows, H], weight [H] (same dtype, fp32/fp16/bf16) -> y [rows, H] (x's dtype), rstd [rows] fp32; fp32 math:
  //   rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * (offset + w); cast_before_weight rounds x * rstd to
  //   x's dtype before the weight multiply (LlamaRMSNorm), else one rounding at the end (Gemma3RMSNorm).
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps, float offset, bool cast_before_weight) "
        "-> (Tensor y, Tensor rstd)");
  // dx [rows, H] (x's dtype), dw [H] fp32 summed over rows ([0] when not compute_dw).
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float offset, bool cast_before_weight, "
        "bool compute_dw) -> (Tensor dx, Tensor dw)");
  // In place on q [tokens, heads, D], k [tokens, kv_heads, D] (last dim contiguous): rotate the first
  // rot_dim dims (HF rotate_half), cos / sin [tokens, rot_dim]; inverse applies the transposed rotation (backward).
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool inverse) -> ()");
  // The same rotation into new contiguous tensors (q, k only read; the dims past rot_dim copied): the functional
  // form, which torch.compile traces without a mutation (and the backward uses: one read, one write).
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
  // ---- end RMSNorm and RoPE ----
  // ---- attention with sinks, sliding window, softcap, GQA, packed documents (python/sloth/ops/attention.py) ----
  // q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D]; or packed q [Tq, Hq, D], k / v [Tk, Hkv, D] with cu_seqlens_q /
  // cu_seqlens_k [docs + 1] int32 and max_seqlen_q / max_seqlen_k (the longest document). Causal masking is
  // bottom-right aligned; window: keys j > i + Sk - Sq - window (-1: none); softcap <= 0: none; sinks [Hq] fp32.
  // out: q's shape and dtype; lse fp32 (sink included): [B, Hq, Sq], packed [Hq, Tq].
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int window, float softcap) "
        "-> (Tensor out, Tensor lse)");
  // dq / dk / dv shaped as q / k / v; dsinks [Hq] fp32 ([0] without sinks).
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? sinks, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, "
        "int window, float softcap) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
  // ---- end attention ----
}

// `import sloth._C` loads the registrations above; the module itself is empty, which keeps the
// extension on Python's limited API (one abi3 build for every CPython >= 3.10).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sloth operator library", -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
