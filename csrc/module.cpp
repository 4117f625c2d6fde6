// The Python module object for `import sparkct._C`. Importing it runs the TORCH_LIBRARY static
// registrations in the other translation units; the ops live in torch.ops.sparkct, not here.
// pybind11 alone is far lighter to compile than torch/extension.h.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparkct kernels; the ops are registered in torch.ops.sparkct";
}
