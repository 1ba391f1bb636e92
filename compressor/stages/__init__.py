"""The prune job's stages, in the order the job runs them (jobs/prune.py):

    plan      the units of the model (and merge units), its deployment on the profile
    width     with --moves width or depth+width: width units at measured channel steps
    reach     the unpruned model against the most that may be removed: is the target reachable?
    scores    every unit's importance under the criterion, on calibration data
    table     each unit's measured latency saving (the lookup table), measured or reused
    choose    the measured search: the removal set that meets the target with least importance lost
    recover   surgery, then fine-tuning by distillation; fidelity before and after
    deliver   fold, export and validate the artifacts, write the checkpoint
    verify    the final, longer interleaved measurement of baseline and pruned artifacts

Each stage is a function with typed inputs that returns a small result dataclass.
"""
