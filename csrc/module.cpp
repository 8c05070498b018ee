// `import featadapt._C` loads this library, which registers the CPU op
// (cpu_vefa.cpp) and, in a build with CUDA, the featadapt::cuda_* ops
// (cuda_ops.cpp), all on PyTorch's stable ABI. The module itself carries
// what Python reads of the build: its CUDA architectures (or why it has
// none) and the CPU kernel's capability and threads. It uses only Python's
// limited API (Py_LIMITED_API, set by setup.py), so one build serves every
// Python the wheel's abi3 tag names.
#include <Python.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <set>
#include <thread>

#include "build_info.h"
#include "cpu_simd.h"
#include "stable_util.h"

// _C.cpu_capability(): the instruction set the CPU kernels use in this call's
// environment (cpu_simd.h), so that tests and `featadapt.info` can say which.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(featadapt::cpu::kCapabilityNames[static_cast<int>(featadapt::cpu::capability())]);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

// _C.parallel_threads(): how many threads torch's parallel_for runs here, as the
// CPU kernel uses it. Without OpenMP at build time it is a serial loop (1), a
// regression no result would show, so the tests check this.
static PyObject* parallel_threads(PyObject*, PyObject*) {
  try {
    const int64_t tasks = static_cast<int64_t>(torch::stable::get_num_threads());
    std::mutex lock;
    std::set<std::thread::id> seen;
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
      const std::lock_guard<std::mutex> hold(lock);
      seen.insert(std::this_thread::get_id());
    });
    return PyLong_FromLong(static_cast<long>(seen.size()));
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

static PyMethodDef featadapt_c_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set featadapt's CPU kernels use here: default, avx2 or avx512."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "How many threads torch's parallel_for runs in featadapt's CPU kernels (torch.get_num_threads() when built "
     "with OpenMP)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef featadapt_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "featadapt's kernels: importing this registers the CPU ops and, when built with CUDA, the featadapt::cuda_* ops.",
    -1, featadapt_c_methods};

// module.NAME = value, with value's reference handed over; false (module
// released) when either failed.
static bool add(PyObject* module, const char* name, PyObject* value) {
  if (value != nullptr && PyModule_AddObject(module, name, value) == 0) return true;
  Py_XDECREF(value);
  Py_DECREF(module);
  return false;
}

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&featadapt_c_module);
  if (module == nullptr) return nullptr;
  const int archs[] = {0, FEATADAPT_CUDA_ARCH_LIST};
  const Py_ssize_t count = static_cast<Py_ssize_t>(sizeof(archs) / sizeof(archs[0]) - 1);
  PyObject* tuple = PyTuple_New(count);
  for (Py_ssize_t i = 0; tuple != nullptr && i < count; ++i) {
    if (PyTuple_SetItem(tuple, i, PyLong_FromLong(archs[i + 1])) != 0) {  // (steals the item, even on failure)
      Py_DECREF(tuple);
      tuple = nullptr;
    }
  }
  if (!add(module, "cuda_archs", tuple)) return nullptr;
  if (!add(module, "no_cuda_reason", PyUnicode_FromString(FEATADAPT_NO_CUDA_REASON))) return nullptr;
  return module;
}
