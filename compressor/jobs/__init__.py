"""The user-facing jobs, thin over the stages and packages: prune, score, bench, export, fold, train."""
