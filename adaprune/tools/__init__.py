"""adaprune's tooling: the `adaprune` command (convert, calibrate, inspect, publish, demo, bench), calibration,
plots, model cards, benchmarks and tiny local checkpoints.

Nothing here is copied next to a checkpoint: the remote code a checkpoint carries is the flat set of modules in
the package root, which never import from this subpackage.
"""
