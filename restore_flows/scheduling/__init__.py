"""Pure scheduling: what work is left, in what order it should go, and how long it will take.

Nothing here reads a clock, sleeps, or talks to a database or a machine: the same code decides the
live and rehearsal runs (on real time) and the forecast (on a virtual clock).
"""
