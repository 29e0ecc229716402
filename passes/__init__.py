"""bertopt's rewrite passes, one module per pass (shipped as the package `bertopt.passes`).

A module here registers its pass with `bertopt.pipeline.register_pass`; the registry imports every
module of this package, so a new pass is a new file and nothing else.
"""
