// out_type_of and the other shared op checks live in csrc/include/sloth/op_checks.h (included here for the
// kernel families that include this header).
#pragma once
#include "sloth/op_checks.h"
