"""Process start-up, the parallel layout (ParallelDims), collectives, the device rule, the memory plan."""
