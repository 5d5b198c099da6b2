# Finds torch through the interpreter that builds us and decides whether CUDA kernels are compiled.
# Sets NSA_ENABLE_CUDA (ON/OFF) and NSA_TORCH_TARGET (the target to link), plus NSA_TORCH_VERSION,
# NSA_CUDA_VERSION and NSA_CUDA_ARCHS for build_info().

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch,sys;sys.stdout.write(';'.join([torch.utils.cmake_prefix_path, torch.__version__, torch.version.cuda or '']))"
  OUTPUT_VARIABLE _nsa_torch_query COMMAND_ERROR_IS_FATAL ANY)
list(GET _nsa_torch_query 0 _nsa_torch_prefix)
list(GET _nsa_torch_query 1 NSA_TORCH_VERSION)
list(LENGTH _nsa_torch_query _nsa_len)
set(_nsa_torch_cuda "")
if(_nsa_len GREATER 2)
  list(GET _nsa_torch_query 2 _nsa_torch_cuda)
endif()
list(APPEND CMAKE_PREFIX_PATH "${_nsa_torch_prefix}")

# Decide CUDA before find_package(Torch): a CUDA torch without nvcc is fatal inside TorchConfig.
set(NSA_ENABLE_CUDA "AUTO" CACHE STRING "Build CUDA kernels: ON, OFF or AUTO (when torch has CUDA and nvcc exists)")
include(CheckLanguage)
check_language(CUDA)
if(NSA_ENABLE_CUDA STREQUAL "AUTO")
  if(_nsa_torch_cuda AND CMAKE_CUDA_COMPILER)
    set(NSA_ENABLE_CUDA ON)
  else()
    set(NSA_ENABLE_CUDA OFF)
  endif()
elseif(NSA_ENABLE_CUDA AND NOT _nsa_torch_cuda)
  message(FATAL_ERROR "NSA_ENABLE_CUDA=ON but torch ${NSA_TORCH_VERSION} is a CPU build")
endif()

set(NSA_CUDA_VERSION "")
set(NSA_CUDA_ARCHS "")
if(NSA_ENABLE_CUDA)
  if(NOT TORCH_CUDA_ARCH_LIST)
    # torch's own default starts at sm_50, which nvcc 13 rejects.
    set(TORCH_CUDA_ARCH_LIST "8.0+PTX;9.0a")
  endif()
  set(ENV{TORCH_CUDA_ARCH_LIST} "${TORCH_CUDA_ARCH_LIST}")
  set(CMAKE_CUDA_ARCHITECTURES OFF)  # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags itself
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # torch's legacy FindCUDA guesses the toolkit root from the first nvcc on PATH; a wrapper script
  # there sends it to the wrong folder. Point it at the toolkit CMake found.
  if(NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/include/cuda_runtime.h")
    get_filename_component(_nsa_cuda_root "${CUDAToolkit_BIN_DIR}/.." ABSOLUTE)
    set(CUDA_TOOLKIT_ROOT_DIR "${_nsa_cuda_root}" CACHE PATH "CUDA toolkit root for torch's FindCUDA" FORCE)
  endif()
  find_package(Torch REQUIRED CONFIG)
  set(NSA_TORCH_TARGET torch)  # not TORCH_LIBRARIES: it drags in nvrtc, which this toolkit lacks
  set(NSA_CUDA_VERSION "${CUDAToolkit_VERSION}")
  string(REPLACE ";" " " NSA_CUDA_ARCHS "${TORCH_CUDA_ARCH_LIST}")
else()
  # CPU-only, also with a CUDA torch and no nvcc: headers and libraries straight from torch.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import torch.utils.cpp_extension as c,sys;sys.stdout.write('|'.join([';'.join(c.include_paths()), c.library_paths()[0]]))"
    OUTPUT_VARIABLE _nsa_torch_paths COMMAND_ERROR_IS_FATAL ANY)
  string(REPLACE "|" ";" _nsa_torch_paths "${_nsa_torch_paths}")
  list(POP_BACK _nsa_torch_paths _nsa_torch_lib)
  add_library(nsa_torch_cpu INTERFACE)
  target_include_directories(nsa_torch_cpu SYSTEM INTERFACE ${_nsa_torch_paths})
  target_link_directories(nsa_torch_cpu INTERFACE "${_nsa_torch_lib}")
  target_link_libraries(nsa_torch_cpu INTERFACE torch torch_cpu c10)
  # Match torch's C++ ABI so std::string crosses the library boundary intact.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import torch,sys;sys.stdout.write(str(int(torch.compiled_with_cxx11_abi())))"
    OUTPUT_VARIABLE _nsa_cxx11_abi COMMAND_ERROR_IS_FATAL ANY)
  target_compile_definitions(nsa_torch_cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${_nsa_cxx11_abi})
  set(NSA_TORCH_TARGET nsa_torch_cpu)
endif()
message(STATUS "nsa_ext: torch ${NSA_TORCH_VERSION} (CUDA '${_nsa_torch_cuda}'), CUDA kernels: ${NSA_ENABLE_CUDA} ${NSA_CUDA_ARCHS}")
