# The CPU fast forward: parity with the fixtures and with the reference.
mmdit_add_test(cpu_fast_forward_test SOURCES cpu_fast_forward_test.cc
               LIBS mmdit_test_util mmdit_cpu LABELS cpu)
# The thread pool and a small threaded forward, also in the ThreadSanitizer workflow (label tsan).
add_test(NAME cpu_fast_forward_threads
         COMMAND cpu_fast_forward_test --gtest_filter=ThreadPoolTest.*)
set_tests_properties(cpu_fast_forward_threads PROPERTIES LABELS "cpu;tsan")
