// The Python module acf._C: importing it loads this library, whose static initialisers register the
// ops of csrc/*.cpp under torch.ops.acf (no pybind11: only a module with two constants).
#include <Python.h>

#include "fixed_point_anderson.h"

static struct PyModuleDef acf_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                          "ACF compiled extension: operators under torch.ops.acf", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&acf_c_module);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  PyModule_AddIntConstant(mod, "MAX_ANDERSON_MEMORY", acf_anderson::kMaxMemory);
  return mod;
}
