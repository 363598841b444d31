// Maps torch dtypes onto the raw element types of csrc/include/sloth/numeric.h.
#pragma once
#include <ATen/ATen.h>

#include "sloth/numeric.h"

namespace sloth {

inline OutType out_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutType::kF32;
    case at::kHalf: return OutType::kF16;
    case at::kBFloat16: return OutType::kBF16;
    default: TORCH_CHECK(false, "sloth: expected float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace sloth
