# The CPU fast forward: parity with the fixtures and with the reference.
mmdit_add_test(cpu_fast_forward_test SOURCES cpu_fast_forward_test.cc
               LIBS mmdit_test_util mmdit_cpu LABELS cpu)
