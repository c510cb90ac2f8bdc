# The CUDA forward: parity with the fixtures and the CPU reference. Needs a GPU to run (each test
# skips without one) and builds wherever CUDA is on, so CI compiles it.
if(MMDIT_HAVE_CUDA AND TARGET mmdit_cuda)
  mmdit_add_test(gpu_tests SOURCES gpu_forward_test.cc
                 LIBS mmdit_test_util mmdit_cuda mmdit_cpu LABELS gpu)
endif()
