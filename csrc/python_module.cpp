// Importing inmap_ext._C loads this library, whose static initialisers register the ops of
// csrc/inmap.cpp with the dispatcher. The Python module itself is empty: ops are reached as
// torch.ops.inmap_ext.<op>. (pip build only; the CMake build makes a plain shared library.)
#include <Python.h>

static struct PyModuleDef inmap_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&inmap_module); }
