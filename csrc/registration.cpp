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
}

// `import sloth._C` loads the registrations above; the module itself is empty, which keeps the
// extension on Python's limited API (one abi3 build for every CPython >= 3.10).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sloth operator library", -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
