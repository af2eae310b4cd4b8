# Installs moe into a scratch prefix, then configures, builds and runs tests/consumer against it.
file(REMOVE_RECURSE ${WORK_DIR})
foreach(step
    "${CMAKE_COMMAND};-S;${MOE_SOURCE_DIR};-B;${WORK_DIR}/moe-build;-DMOE_BUILD_TESTS=OFF;-DMOE_BUILD_EXAMPLES=OFF;-DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix"
    "${CMAKE_COMMAND};--install;${WORK_DIR}/moe-build"
    "${CMAKE_COMMAND};-S;${MOE_SOURCE_DIR}/tests/consumer;-B;${WORK_DIR}/consumer-build;-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix;-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}"
    "${CMAKE_COMMAND};--build;${WORK_DIR}/consumer-build"
    "${WORK_DIR}/consumer-build/consumer")
  execute_process(COMMAND ${step} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer step failed (${rc}): ${step}\n${out}\n${err}")
  endif()
endforeach()
message(STATUS "consumer project built and ran against the installed moe")
