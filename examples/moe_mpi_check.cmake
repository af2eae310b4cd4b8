# ctest driver for examples/moe_mpi: the checksum of the logits must be the same for the
# single-process model (--single) and for 1, 2, 3 and 4 ranks, both placements.
# -DMPIEXEC=... -DNP_FLAG=... -DMPIEXEC_FLAGS="a;b" -DEXE=... -DCHECKPOINT=... -DTOKENS=...
function(run_one out_var)
  execute_process(COMMAND ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
                  TIMEOUT 120)
  string(REGEX MATCH "checksum: ([0-9a-f]+)" line "${out}")
  if(NOT rc EQUAL 0 OR NOT line)
    message(FATAL_ERROR "moe_mpi failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  set(${out_var} "${CMAKE_MATCH_1}" PARENT_SCOPE)
endfunction()

run_one(reference ${MPIEXEC} ${NP_FLAG} 1 ${MPIEXEC_FLAGS} ${EXE} --single
        --checkpoint ${CHECKPOINT} --tokens ${TOKENS})
message(STATUS "single process: checksum ${reference}")
foreach(placement contiguous round_robin)
  foreach(np 1 2 3 4)
    run_one(sum ${MPIEXEC} ${NP_FLAG} ${np} ${MPIEXEC_FLAGS} ${EXE} --checkpoint ${CHECKPOINT}
            --tokens ${TOKENS} --placement ${placement})
    message(STATUS "${np} ranks, ${placement}: checksum ${sum}")
    if(NOT sum STREQUAL reference)
      message(FATAL_ERROR "checksum ${sum} on ${np} ranks (${placement}) differs from the "
                          "single-process ${reference}")
    endif()
  endforeach()
endforeach()
