/* A Python extension with no Python-level methods: mxtools.native loads this shared object with ctypes
 * (which releases the GIL around every call) and calls its exported C functions. */
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lib", "mxtools native kernels (used via ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__lib(void) { return PyModule_Create(&module); }
