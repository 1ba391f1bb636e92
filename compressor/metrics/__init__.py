"""How a changed model compares: fidelity to the unpruned model, CKA and KL, lossy (INT8) fidelity, FLOPs."""
