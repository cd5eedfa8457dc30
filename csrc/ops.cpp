// The stochnorm_ext operator library: op schemas live here (TORCH_LIBRARY), kernels
// register per dispatch key from csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing stochnorm_ext._C loads this shared library, which runs the registrations
// below; no Python functions are exported, so no pybind11 is needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stochnorm_ext, m) {
  // Op schemas are added by the kernel backends (see DESIGN.md: the shared core).
}
