"""Tensor-parallel serving: rank 0's engine and every other rank's kept in lockstep (:mod:`.lockstep`); the
launcher is :mod:`s2d_ext.cli.serve_tp`."""
