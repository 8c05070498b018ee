// What the build decided, for the library to report (module.cpp, cuda_ops.cpp):
// setup.py writes featadapt_build_config.h into build/generated, which it puts
// on the include path; a build without it (CMake's) defines the same macros
// on the command line, or gets these defaults.
#pragma once

#if __has_include("featadapt_build_config.h")
#include "featadapt_build_config.h"
#endif

// The compute capabilities the CUDA kernels were compiled for, e.g. 80, 90;
// empty when the library has no CUDA kernels.
#ifndef FEATADAPT_CUDA_ARCH_LIST
#define FEATADAPT_CUDA_ARCH_LIST
#endif

// Why the library has no CUDA kernels ("" when it has them).
#ifndef FEATADAPT_NO_CUDA_REASON
#define FEATADAPT_NO_CUDA_REASON ""
#endif
