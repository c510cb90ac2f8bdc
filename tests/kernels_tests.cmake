# The compute library: parsers, config, weights, the CPU reference forward, mmdit-run.
mmdit_add_test(safetensors_test SOURCES safetensors_test.cc LIBS mmdit_kernels)
mmdit_add_test(half_float_test SOURCES half_float_test.cc LIBS mmdit_kernels)
mmdit_add_test(model_weights_test SOURCES model_weights_test.cc LIBS mmdit_test_util mmdit_kernels)
mmdit_add_test(reference_forward_test SOURCES reference_forward_test.cc
               LIBS mmdit_test_util mmdit_cpu)
mmdit_add_test(model_repository_test SOURCES model_repository_test.cc
               LIBS mmdit_test_util mmdit_repository)
mmdit_add_test(mmdit_run_test SOURCES mmdit_run_test.cc LIBS mmdit_test_util mmdit_kernels)
add_dependencies(mmdit_run_test mmdit-run)
